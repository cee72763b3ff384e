"""CUDA C++ kernels (torch.ops.bip_fast.* on CUDA tensors) against plain-torch computations.

Masks and histograms must be bit-equal, with ties on purpose (integer-valued and all-equal
scores, signed zeros); floating outputs are compared with dtype-appropriate tolerances against
float64 computations. Every test needs a GPU and bip_fast._C_cuda: the probe runs inside the
`cuda_ops` fixture (never at import time) and skips with the reason.
"""
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHUNK = 8192  # kChunk of csrc/cuda/kernels.cuh: sizes around it exercise chunk borders


@pytest.fixture
def cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    from bip_fast import _ext

    if not _ext.cuda_ext_available():
        pytest.skip(f"bip_fast._C_cuda not loadable: {_ext.build_info()['reasons'].get('cuda')}")
    for name in ("radix_histogram", "topk_masks", "topk_masks_hist", "masked_weight",
                 "masked_weight_backward", "fused_sgd_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bip_fast::{name}", "CUDA"), name
    return torch.ops.bip_fast


# ----------------------------------------------------------------------------- plain torch
from plain_ref import hist_plain, keys_of, scores_of_kind, topk_plain  # noqa: E402


def assert_masks_equal(got, want, xs):
    assert len(got) == len(want) == len(xs)
    for i, (g, w, x) in enumerate(zip(got, want, xs)):
        assert g.device.type == "cuda", i
        assert g.dtype == torch.bool, i
        assert g.shape == x.shape, i
        assert g.is_contiguous(), i
        assert torch.equal(g.cpu(), w), f"mask {i} differs in {int((g.cpu() != w).sum())} places"


def make_scores(kind, dtype, dev, seed=0):
    shapes = [(16, 3, 3, 3), (40, 17), (5,), (300, 260), (2, 1), (CHUNK + 3,), (0,), (3, CHUNK - 1)]
    return [x.to(dev) for x in scores_of_kind(kind, shapes, dtype, seed)]


def keep_values(n):
    return sorted({0, 1, 2, 7, n // 3, n // 2, n - 1, n})


# ----------------------------------------------------------------------------- topk_masks
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", ["randn", "int", "equal"])
def test_topk_masks_matches_plain(cuda_ops, dtype, kind):
    xs = make_scores(kind, dtype, "cuda")
    n = sum(x.numel() for x in xs)
    for keep in keep_values(n):
        got = cuda_ops.topk_masks(xs, keep)
        assert sum(int(m.sum()) for m in got) == keep
        assert_masks_equal(got, topk_plain(xs, keep), xs)


def test_topk_masks_fuzz(cuda_ops):
    g = torch.Generator().manual_seed(123)
    for trial in range(25):
        ntensors = int(torch.randint(1, 6, (1,), generator=g))
        xs = []
        for _ in range(ntensors):
            numel = int(torch.randint(0, 3 * CHUNK, (1,), generator=g))
            dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=g))]
            if trial % 2:
                x = torch.randint(-20, 21, (numel,), generator=g).float()  # ties
            else:
                x = torch.randn(numel, generator=g) * 10 ** float(torch.randint(-6, 6, (1,),
                                                                                 generator=g))
            xs.append(x.to(dtype).cuda())
        n = sum(x.numel() for x in xs)
        keeps = {0, n} | {int(k) for k in torch.randint(0, n + 1, (4,), generator=g)}
        for keep in sorted(keeps):
            assert_masks_equal(cuda_ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_noncontiguous_channels_last_misaligned(cuda_ops):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-5, 6, (64, 48), generator=g).float().cuda().t()  # transposed view
    b = (torch.randint(-5, 6, (8, 6, 5, 5), generator=g).float().cuda()
         .to(memory_format=torch.channels_last))
    c = torch.randn(100, 30, generator=g).cuda()[:, ::3]  # strided slice
    base = torch.randint(-9, 10, (2 * CHUNK + 11,), generator=g).half().cuda()
    d = base[1:]  # contiguous but 2 bytes off the allocation: scalar (misaligned) path
    e = torch.randn(3 * CHUNK + 6, generator=g).cuda()[2:]  # 8 bytes off: no float4 loads
    xs = [a, b, c, d, e]
    assert not a.is_contiguous() and not b.is_contiguous() and not c.is_contiguous()
    assert d.is_contiguous() and d.data_ptr() % 8 != 0 and e.data_ptr() % 16 != 0
    n = sum(x.numel() for x in xs)
    for keep in [1, 100, n // 3, n // 2, n - 1]:
        got = cuda_ops.topk_masks(xs, keep)
        assert_masks_equal(got, topk_plain(xs, keep), xs)
        assert_masks_equal(got, cuda_ops.topk_masks([x.contiguous() for x in xs], keep), xs)


def test_topk_masks_large_multichunk_ties(cuda_ops):
    # the threshold's tied keys span many chunks: exactly one chunk straddles `need`
    g = torch.Generator().manual_seed(2)
    xs = [torch.randint(0, 3, (400_000,), generator=g).float().cuda(), torch.ones(150_000).cuda(),
          torch.randint(0, 3, (1000, 333), generator=g).half().cuda(),
          torch.randint(0, 3, (77_777,), generator=g).bfloat16().cuda()]
    n = sum(x.numel() for x in xs)
    keys = keys_of(xs)
    n_ge2 = int((keys >= keys_of([torch.tensor([2.0])])[0]).sum())
    for keep in [1, CHUNK - 1, CHUNK, CHUNK + 1, 123_457, n_ge2, n_ge2 + 1, n // 2, n - 5, n - 1]:
        got = cuda_ops.topk_masks(xs, keep)
        assert_masks_equal(got, topk_plain(xs, keep), xs)


def test_topk_masks_many_tensors(cuda_ops):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(-2, 3, (int(torch.randint(0, 50, (1,), generator=g)),),
                        generator=g).float().cuda() for _ in range(300)]
    n = sum(x.numel() for x in xs)
    for keep in [0, 1, n // 4, n // 2, n - 1, n]:
        assert_masks_equal(cuda_ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_signed_zero_and_extremes(cuda_ops):
    xs = [torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0]).cuda()]
    for keep in range(9):
        assert_masks_equal(cuda_ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_empty(cuda_ops):
    xs = [torch.zeros(0).cuda(), torch.zeros(3, 0).cuda()]
    assert_masks_equal(cuda_ops.topk_masks(xs, 0), topk_plain(xs, 0), xs)
    xs = [torch.zeros(0).cuda(), torch.randn(10).cuda(), torch.zeros(3, 0).cuda()]
    for keep in [0, 4, 10]:
        assert_masks_equal(cuda_ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_errors(cuda_ops):
    xs = [torch.randn(10).cuda()]
    with pytest.raises(RuntimeError, match="keep"):
        cuda_ops.topk_masks(xs, 11)
    with pytest.raises(RuntimeError, match="keep"):
        cuda_ops.topk_masks(xs, -1)
    with pytest.raises(RuntimeError, match=r"scores\[1\]"):
        cuda_ops.topk_masks([xs[0], torch.randint(0, 3, (4,)).cuda()], 1)


# ----------------------------------------------------------------------------- histograms
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_matches_plain(cuda_ops, dtype):
    xs = make_scores("randn", dtype, "cuda", seed=4)
    keys = keys_of(xs)
    top = int(keys.max())
    for shift, bits, prefix, prefix_shift in [
        (19, 12, 0, 31), (19, 12, 0, 40), (7, 12, top >> 19, 19), (0, 7, top >> 7, 7),
        (0, 12, 0, 31), (20, 11, 0, 31), (3, 1, top >> 4, 4), (7, 12, 12345, 19),
    ]:
        got = cuda_ops.radix_histogram(xs, shift, bits, prefix, prefix_shift)
        assert got.dtype == torch.int64 and got.shape == (4096,) and got.device.type == "cuda"
        assert torch.equal(got.cpu(), hist_plain(xs, shift, bits, prefix, prefix_shift))


@pytest.mark.parametrize("kind", ["randn", "int"])
def test_topk_masks_hist_matches_topk_masks(cuda_ops, kind):
    xs = make_scores(kind, torch.float32, "cuda", seed=5)
    n = sum(x.numel() for x in xs)
    h = cuda_ops.radix_histogram(xs, 19, 12, 0, 31)
    for keep in keep_values(n):
        got = cuda_ops.topk_masks_hist(xs, keep, h)
        assert_masks_equal(got, topk_plain(xs, keep), xs)
    with pytest.raises(RuntimeError, match="hist1"):
        cuda_ops.topk_masks_hist(xs, 1, torch.zeros(10, dtype=torch.int64, device="cuda"))


# ----------------------------------------------------------------------------- fused_sgd_
def sgd_plain(p, g, b, lr, mom, wd):
    """float64 SGD step (dampening 0, no nesterov)."""
    p64, g64, b64 = p.double(), g.double(), b.double()
    d = g64 + wd * p64
    b64 = mom * b64 + d
    return p64 - lr * b64, b64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hist", [False, True])
def test_fused_sgd_matches_plain(cuda_ops, dtype, with_hist):
    g = torch.Generator().manual_seed(6)
    shapes = [(64, 3, 3, 3), (10,), (CHUNK + 5,), (0,), (3, 1), (2 * CHUNK - 1, 2)]
    ps = [torch.randn(s, generator=g).to(dtype).cuda() for s in shapes]
    gs = [torch.randn(s, generator=g).to(dtype).cuda() for s in shapes]
    bs = [(torch.randn(s, generator=g) * (i % 2)).to(dtype).cuda() for i, s in enumerate(shapes)]
    lr, mom, wd = 0.05, 0.9, 1e-3
    want = [sgd_plain(p, gr, b, lr, mom, wd) for p, gr, b in zip(ps, gs, bs)]
    p0 = [p.clone() for p in ps]
    hist = torch.zeros(4096, dtype=torch.int64, device="cuda") if with_hist else None
    cuda_ops.fused_sgd_(ps, gs, bs, lr, mom, wd, hist)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for p, b, (wp, wb), q in zip(ps, bs, want, p0):
        torch.testing.assert_close(p.double(), wp, rtol=tol, atol=tol)
        torch.testing.assert_close(b.double(), wb, rtol=tol, atol=tol)
        # float32 math then one rounding: at most one rounding step away from float64
        assert p.dtype == q.dtype
    if with_hist:
        assert torch.equal(hist.cpu(), hist_plain(ps, 19, 12, 0, 31))
        n = sum(p.numel() for p in ps)
        for keep in [1, n // 2, n - 1]:
            assert_masks_equal(cuda_ops.topk_masks_hist(ps, keep, hist), topk_plain(ps, keep), ps)


def test_fused_sgd_float32_bitwise(cuda_ops):
    # float32: same op-by-op rounding as the torch expression (no FMA contraction)
    g = torch.Generator().manual_seed(7)
    p = torch.randn(10_003, generator=g).cuda()
    gr = torch.randn(10_003, generator=g).cuda()
    b = torch.randn(10_003, generator=g).cuda()
    lr, mom, wd = 0.1, 0.9, 1e-4
    d = gr + torch.tensor(wd, dtype=torch.float32) * p
    wb = torch.tensor(mom, dtype=torch.float32) * b + d
    wp = p - torch.tensor(lr, dtype=torch.float32) * wb
    cuda_ops.fused_sgd_([p], [gr], [b], lr, mom, wd, None)
    torch.testing.assert_close(b, wb, rtol=0, atol=0)
    torch.testing.assert_close(p, wp, rtol=0, atol=0)


def test_fused_sgd_layouts(cuda_ops):
    g = torch.Generator().manual_seed(8)
    # channels_last param + contiguous grad/buffer; transposed (non-contiguous) param;
    # strided (non-dense) param; misaligned param
    p1 = torch.randn(8, 6, 5, 5, generator=g).cuda().to(memory_format=torch.channels_last)
    p2 = torch.randn(33, 70, generator=g).cuda().t()
    p3 = torch.randn(40, 30, generator=g).cuda()[:, ::2]
    p4 = torch.randn(1001, generator=g).cuda()[1:]
    ps = [p1, p2, p3, p4]
    gs = [torch.randn(p.shape, generator=g).cuda() for p in ps]
    bs = [torch.randn(p.shape, generator=g).cuda() for p in ps]
    bs[1] = bs[1].t().contiguous().t()  # same strides as p2
    lr, mom, wd = 0.01, 0.9, 1e-2
    want = [sgd_plain(p, gr, b, lr, mom, wd) for p, gr, b in zip(ps, gs, bs)]
    hist = torch.zeros(4096, dtype=torch.int64, device="cuda")
    cuda_ops.fused_sgd_(ps, gs, bs, lr, mom, wd, hist)
    for p, b, (wp, wb) in zip(ps, bs, want):
        torch.testing.assert_close(p.double(), wp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), wb, rtol=1e-5, atol=1e-6)
    assert torch.equal(hist.cpu(), hist_plain(ps, 19, 12, 0, 31))


def test_fused_sgd_errors(cuda_ops):
    p = [torch.randn(4).cuda()]
    with pytest.raises(RuntimeError, match="grads"):
        cuda_ops.fused_sgd_(p, [], [torch.zeros(4).cuda()], 0.1, 0.9, 0.0, None)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\]"):
        cuda_ops.fused_sgd_(p, [torch.randn(4).cuda()], [torch.zeros(5).cuda()], 0.1, 0.9, 0.0,
                            None)
    with pytest.raises(RuntimeError, match="hist1"):
        cuda_ops.fused_sgd_(p, [torch.randn(4).cuda()], [torch.zeros(4).cuda()], 0.1, 0.9, 0.0,
                            torch.zeros(4096, dtype=torch.int32, device="cuda"))


# ----------------------------------------------------------------------------- masked weight
SHAPES = [(7,), (64, 3, 3, 3), (CHUNK + 3,), (0,), (5, 1), (33, 17)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_masked_weight_matches_plain(cuda_ops, dtype):
    g = torch.Generator().manual_seed(9)
    for shape in SHAPES:
        theta = torch.randn(shape, generator=g).to(dtype).cuda()
        mask = (torch.rand(shape, generator=g) > 0.4).cuda()
        z = cuda_ops.masked_weight(theta, mask)
        assert z.dtype == dtype and z.shape == theta.shape and z.is_contiguous()
        want = theta * mask
        assert torch.equal(z, want)
        assert torch.equal(torch.signbit(z), torch.signbit(want))  # -0.0 where masked


def test_masked_weight_layouts(cuda_ops):
    g = torch.Generator().manual_seed(10)
    theta = torch.randn(8, 6, 5, 5, generator=g).cuda().to(memory_format=torch.channels_last)
    mask = (torch.rand(8, 6, 5, 5, generator=g) > 0.5).cuda()
    assert torch.equal(cuda_ops.masked_weight(theta, mask), theta * mask)
    t2 = torch.randn(1003, generator=g).cuda()[1:]  # misaligned theta (1002 elements)
    m2 = (torch.rand(1005, generator=g) > 0.5).cuda()[3:]  # misaligned mask (1002 elements)
    assert torch.equal(cuda_ops.masked_weight(t2, m2), t2 * m2)
    with pytest.raises(RuntimeError, match="mask"):
        cuda_ops.masked_weight(t2, m2.float())


def backward_plain(grad, theta, mask, scores, ig):
    g, t, m, s = grad.double(), theta.double(), mask.double(), scores.double()
    sgn = torch.where(s >= 0, 1.0, -1.0).to(torch.float64)
    return m * g, sgn * (t * g - ig * m * g * g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ig", [0.0, 1.0, 0.37])
def test_masked_weight_backward_matches_plain(cuda_ops, dtype, score_dtype, ig):
    g = torch.Generator().manual_seed(11)
    for shape in SHAPES:
        grad = torch.randn(shape, generator=g).to(dtype).cuda()
        theta = torch.randn(shape, generator=g).to(dtype).cuda()
        mask = (torch.rand(shape, generator=g) > 0.4).cuda()
        scores = torch.randint(-2, 3, shape, generator=g).to(score_dtype).cuda()  # zeros: sgn=+1
        want_dt, want_gs = backward_plain(grad, theta, mask, scores, ig)
        dt, gs = cuda_ops.masked_weight_backward(grad, theta, mask, scores, ig, True, True)
        assert dt.dtype == dtype and gs.dtype == score_dtype
        assert torch.equal(dt, grad * mask)
        # error vs float64 at most ~2x that of the same-dtype torch computation, plus atol
        same_dtype = (torch.where(scores >= 0, 1.0, -1.0).float()
                      * (theta.float() * grad.float() - ig * mask.float() * grad.float() ** 2)
                      ).to(score_dtype)
        err_ref = (same_dtype.double() - want_gs).abs().max() if gs.numel() else 0.0
        err = (gs.double() - want_gs).abs().max() if gs.numel() else 0.0
        assert err <= 2 * err_ref + 1e-6
        torch.testing.assert_close(dt.double(), want_dt)
        # need flags
        dt2, gs2 = cuda_ops.masked_weight_backward(grad, theta, mask, scores, ig, False, True)
        assert dt2.numel() == 0 and torch.equal(gs2, gs)
        dt3, gs3 = cuda_ops.masked_weight_backward(grad, theta, mask, scores, ig, True, False)
        assert gs3.numel() == 0 and torch.equal(dt3, dt)
        dt4, gs4 = cuda_ops.masked_weight_backward(grad, theta, mask, scores, ig, False, False)
        assert dt4.numel() == 0 and gs4.numel() == 0


def test_masked_weight_backward_layouts(cuda_ops):
    g = torch.Generator().manual_seed(12)
    shape = (8, 6, 5, 5)
    grad = torch.randn(shape, generator=g).cuda().to(memory_format=torch.channels_last)
    theta = torch.randn(shape, generator=g).cuda()
    mask = (torch.rand(shape, generator=g) > 0.5).cuda()
    scores = torch.randn(6, 8, 5, 5, generator=g).cuda().transpose(0, 1)
    want_dt, want_gs = backward_plain(grad, theta, mask, scores, 1.0)
    dt, gs = cuda_ops.masked_weight_backward(grad, theta, mask, scores, 1.0, True, True)
    torch.testing.assert_close(dt.double(), want_dt)
    torch.testing.assert_close(gs.double(), want_gs, rtol=1e-5, atol=1e-6)
    assert dt.is_contiguous() and gs.is_contiguous()


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_all_ops(cuda_ops):
    g = torch.Generator().manual_seed(13)
    dev = "cuda"
    xs = [torch.randn(8, 3, generator=g).to(dev),
          torch.randint(-2, 3, (17,), generator=g).float().to(dev)]
    opcheck = torch.library.opcheck
    opcheck(cuda_ops.topk_masks.default, (xs, 9))
    h = cuda_ops.radix_histogram(xs, 19, 12, 0, 31)
    opcheck(cuda_ops.topk_masks_hist.default, (xs, 9, h))
    opcheck(cuda_ops.radix_histogram.default, (xs, 7, 12, int(keys_of(xs)[0] >> 19), 19))
    theta = torch.randn(6, 4, generator=g).to(dev)
    mask = (torch.rand(6, 4, generator=g) > 0.5).to(dev)
    opcheck(cuda_ops.masked_weight.default, (theta, mask))
    opcheck(cuda_ops.masked_weight_backward.default,
            (torch.randn(6, 4).to(dev), theta, mask, torch.randn(6, 4).to(dev), 1.0, True, True))
    opcheck(cuda_ops.masked_weight_backward.default,
            (torch.randn(6, 4).to(dev), theta, mask, torch.randn(6, 4).to(dev), 0.0, False, True))
    ps = [torch.randn(5, 3).to(dev), torch.randn(4).to(dev)]
    opcheck(cuda_ops.fused_sgd_.default,
            (ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
             0.1, 0.9, 1e-4, torch.zeros(4096, dtype=torch.int64, device=dev)))
    opcheck(cuda_ops.fused_sgd_.default,
            (ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
             0.1, 0.9, 1e-4, None))


def test_no_host_sync_in_topk(cuda_ops):
    # the whole selection is enqueued without a device->host synchronisation
    xs = [torch.randn(50_000, device="cuda"), torch.randn(3, 7, device="cuda")]
    cuda_ops.topk_masks(xs, 100)  # warm-up (allocator, pinned pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = cuda_ops.topk_masks(xs, 12_345)
        h = cuda_ops.radix_histogram(xs, 19, 12, 0, 31)
        cuda_ops.topk_masks_hist(xs, 12_345, h)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(int(m.sum()) for m in masks) == 12_345
