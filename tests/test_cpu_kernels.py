"""C++ CPU kernels (torch.ops.bip_fast.*) against plain-torch computations written here.

Masks and histograms must be bit-equal, with ties on purpose; floating outputs are compared
with dtype-appropriate tolerances. Skipped (with the loader's reason) when bip_fast._C is absent.
"""
import pytest
import torch

from bip_fast import _ext

if not _ext.cpu_available():
    pytest.skip(f"bip_fast._C not loadable: {_ext.build_info()['reasons'].get('cpu')}",
                allow_module_level=True)

from hypothesis import given, settings, strategies as st  # noqa: E402

ops = torch.ops.bip_fast
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- plain torch
from plain_ref import hist_plain, keys_of, scores_of_kind, topk_plain  # noqa: E402


def assert_masks_equal(got, want, xs):
    assert len(got) == len(want)
    for g, w, x in zip(got, want, xs):
        assert g.dtype == torch.bool
        assert g.shape == x.shape
        assert g.is_contiguous()
        assert torch.equal(g, w)


def make_scores(kind, dtype, seed=0):
    return scores_of_kind(kind, [(16, 3, 3, 3), (40, 17), (5,), (300, 260), (2, 1)], dtype, seed)


# ----------------------------------------------------------------------------- topk_masks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "int", "equal"])
def test_topk_masks_matches_plain(dtype, kind):
    xs = make_scores(kind, dtype)
    n = sum(x.numel() for x in xs)
    for keep in [0, 1, 2, 7, n // 3, n // 2, n - 1, n]:
        got = ops.topk_masks(xs, keep)
        assert sum(int(m.sum()) for m in got) == keep
        assert_masks_equal(got, topk_plain(xs, keep), xs)


def test_topk_masks_noncontiguous_and_channels_last():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-5, 6, (64, 48), generator=g).float().t()  # transposed view
    b = torch.randint(-5, 6, (8, 6, 5, 5), generator=g).float().to(memory_format=torch.channels_last)
    c = torch.randn(100, 30, generator=g)[:, ::3]  # strided slice
    xs = [a, b, c]
    assert not a.is_contiguous() and not b.is_contiguous() and not c.is_contiguous()
    n = sum(x.numel() for x in xs)
    for keep in [1, 100, n // 2, n - 1]:
        got = ops.topk_masks(xs, keep)
        assert_masks_equal(got, topk_plain(xs, keep), xs)
        # the mask agrees with a contiguous copy of the input (logical row-major ties)
        assert_masks_equal(got, ops.topk_masks([x.contiguous() for x in xs], keep), xs)


def test_topk_masks_large_multichunk_ties():
    # big enough for several chunks and threads; ties straddle chunk borders
    g = torch.Generator().manual_seed(2)
    xs = [torch.randint(0, 3, (400_000,), generator=g).float(), torch.ones(150_000),
          torch.randint(0, 3, (1000, 333), generator=g).half()]
    n = sum(x.numel() for x in xs)
    for keep in [1, 123_457, n // 2, n - 5]:
        assert_masks_equal(ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_signed_zero_and_extremes():
    xs = [torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])]
    for keep in range(9):
        assert_masks_equal(ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_empty_tensors_in_list():
    xs = [torch.zeros(0), torch.randn(10), torch.zeros(3, 0)]
    for keep in [0, 4, 10]:
        assert_masks_equal(ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)


def test_topk_masks_bad_keep():
    xs = [torch.randn(10)]
    with pytest.raises(RuntimeError, match="keep"):
        ops.topk_masks(xs, 11)
    with pytest.raises(RuntimeError, match="keep"):
        ops.topk_masks(xs, -1)
    with pytest.raises(RuntimeError, match="floating"):
        ops.topk_masks([torch.arange(10)], 3)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    levels=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_masks_fuzz(sizes, levels, dtype, frac, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randint(-levels, levels + 1, (s,), generator=g).float() / 4).to(dtype)
          for s in sizes]
    n = sum(sizes)
    keep = int(frac * n)
    assert_masks_equal(ops.topk_masks(xs, keep), topk_plain(xs, keep), xs)
    h = ops.radix_histogram(xs, 19, 12, 0, 31)
    assert_masks_equal(ops.topk_masks_hist(xs, keep, h), topk_plain(xs, keep), xs)


# ----------------------------------------------------------------------------- histograms
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_digits(dtype):
    xs = make_scores("randn", dtype, seed=3) + [torch.randn(64, 64).t().to(dtype)]
    keys = keys_of(xs)
    for shift, bits in [(19, 12), (7, 12), (0, 7), (3, 5)]:
        got = ops.radix_histogram(xs, shift, bits, 0, 31)
        assert got.dtype == torch.int64 and got.shape == (4096,)
        assert torch.equal(got, hist_plain(xs, shift, bits, 0, 31))
    # prefix-filtered passes as used by the radix select
    d1 = int(keys[0] >> 19)
    got = ops.radix_histogram(xs, 7, 12, d1, 19)
    assert torch.equal(got, hist_plain(xs, 7, 12, d1, 19))
    p23 = int(keys[1] >> 7)
    got = ops.radix_histogram(xs, 0, 7, p23, 7)
    assert torch.equal(got, hist_plain(xs, 0, 7, p23, 7))
    assert int(got.sum()) >= 1


def test_radix_histogram_bad_args():
    xs = [torch.randn(5)]
    with pytest.raises(RuntimeError, match="bits"):
        ops.radix_histogram(xs, 0, 13, 0, 31)
    with pytest.raises(RuntimeError, match="shift"):
        ops.radix_histogram(xs, 32, 4, 0, 31)


@pytest.mark.parametrize("kind", ["randn", "int", "equal"])
def test_topk_masks_hist_matches(kind):
    xs = make_scores(kind, torch.float32, seed=4)
    n = sum(x.numel() for x in xs)
    h = ops.radix_histogram(xs, 19, 12, 0, 31)
    for keep in [0, 1, n // 4, n - 1, n]:
        assert_masks_equal(ops.topk_masks_hist(xs, keep, h), topk_plain(xs, keep), xs)


def test_topk_masks_hist_rejects_wrong_hist():
    xs = [torch.randn(100)]
    h = ops.radix_histogram(xs, 19, 12, 0, 31)
    with pytest.raises(RuntimeError, match="hist1"):
        ops.topk_masks_hist(xs, 10, h[:100])
    with pytest.raises(RuntimeError, match="hist1"):
        ops.topk_masks_hist(xs, 10, h.float())
    h2 = h.clone()
    h2[0] += 1
    with pytest.raises(RuntimeError, match="hist1"):
        ops.topk_masks_hist(xs, 10, h2)


# ----------------------------------------------------------------------------- masked weight
def _tol(dtype):
    return {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3),
            torch.bfloat16: (1e-2, 1e-2), torch.float64: (1e-12, 1e-12)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_weight(dtype):
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(32, 16, 3, 3, generator=g).to(dtype)
    mask = torch.rand(32, 16, 3, 3, generator=g) > 0.4
    out = ops.masked_weight(theta, mask)
    assert out.dtype == dtype and out.shape == theta.shape and out.is_contiguous()
    assert torch.equal(out, theta * mask)
    cl = theta.to(memory_format=torch.channels_last)
    assert torch.equal(ops.masked_weight(cl, mask), theta * mask)
    assert torch.equal(ops.masked_weight(theta.t() if theta.dim() == 2 else theta[:, :, 1], mask[:, :, 1]),
                       theta[:, :, 1] * mask[:, :, 1])


def test_masked_weight_bad_inputs():
    with pytest.raises(RuntimeError, match="mask"):
        ops.masked_weight(torch.randn(3, 4), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="shape"):
        ops.masked_weight(torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool))


def backward_plain(grad, theta, mask, scores, ig):
    g, t, m, s = grad.double(), theta.double(), mask.double(), scores.double()
    sgn = torch.where(s >= 0, 1.0, -1.0).double()  # sgn(0) = +1 (and -0.0 >= 0)
    return m * g, sgn * (t * g - ig * m * g * g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ig", [0.0, 1.0, 0.25])
def test_masked_weight_backward(dtype, score_dtype, ig):
    g = torch.Generator().manual_seed(6)
    shape = (24, 8, 3, 3)
    grad = torch.randn(shape, generator=g).to(dtype)
    theta = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) > 0.5
    scores = torch.randint(-2, 3, shape, generator=g).to(score_dtype)  # zeros on purpose
    dtheta, gs = ops.masked_weight_backward(grad, theta, mask, scores, ig, True, True)
    want_t, want_s = backward_plain(grad, theta, mask, scores, ig)
    assert dtheta.dtype == dtype and gs.dtype == score_dtype
    assert dtheta.shape == shape and gs.shape == shape
    assert torch.equal(dtheta, (grad * mask).to(dtype))
    # float32 math, one rounding to the output dtype
    assert torch.allclose(gs.double(), want_s.float().to(score_dtype).double(), *_tol(score_dtype))
    # sgn(0) = +1: where scores == 0 the gradient is +(theta*g - ig*m*g^2)
    z = scores == 0
    assert z.any()
    assert torch.allclose(gs[z].double(), (want_s[z]).to(score_dtype).double(), *_tol(score_dtype))


def test_masked_weight_backward_flags_and_layout():
    shape = (6, 5)
    grad, theta, scores = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    mask = torch.rand(shape) > 0.5
    dt, gs = ops.masked_weight_backward(grad, theta, mask, scores, 1.0, False, True)
    assert dt.numel() == 0 and dt.dtype == theta.dtype and gs.shape == shape
    dt, gs = ops.masked_weight_backward(grad, theta, mask, scores, 1.0, True, False)
    assert gs.numel() == 0 and gs.dtype == scores.dtype and dt.shape == shape
    dt, gs = ops.masked_weight_backward(grad, theta, mask, scores, 1.0, False, False)
    assert dt.numel() == 0 and gs.numel() == 0
    # non-contiguous operands give the same values
    a, b = ops.masked_weight_backward(grad.t().contiguous().t(), theta.t().contiguous().t(),
                                      mask, scores.t().contiguous().t(), 0.5, True, True)
    a2, b2 = ops.masked_weight_backward(grad, theta, mask, scores, 0.5, True, True)
    assert torch.equal(a, a2) and torch.equal(b, b2)


# ----------------------------------------------------------------------------- fused SGD
def sgd_plain(p, g, b, lr, momentum, wd):
    d = g.float() + wd * p.float()
    b_new = momentum * b.float() + d
    return (p.float() - lr * b_new), b_new


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_sgd_matches_formula(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 3, 3, 3), (10, 7), (1,), (70_000,)]
    ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    gs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    bs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    want = [sgd_plain(p, gg, b, 0.1, 0.9, 1e-2) for p, gg, b in zip(ps, gs, bs)]
    ps_ptr = [p.data_ptr() for p in ps]
    assert ops.fused_sgd_(ps, gs, bs, 0.1, 0.9, 1e-2, None) is None
    for p, b, (wp, wb), ptr in zip(ps, bs, want, ps_ptr):
        assert p.data_ptr() == ptr and p.dtype == dtype
        assert torch.allclose(b.float(), wb.to(dtype).float(), *_tol(dtype))
        assert torch.allclose(p.float(), wp.to(dtype).float(), *_tol(dtype))


def test_fused_sgd_matches_torch_optim_sgd():
    torch.manual_seed(8)
    ps = [torch.randn(20, 5), torch.randn(33)]
    ref = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=1e-4)
    bs = [torch.zeros_like(p) for p in ps]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ps]
        for r, gg in zip(ref, grads):
            r.grad = gg.clone()
        opt.step()
        ops.fused_sgd_(ps, grads, bs, 0.05, 0.9, 1e-4, None)
    for p, r in zip(ps, ref):
        assert torch.allclose(p, r.detach(), atol=1e-6, rtol=1e-6)


def test_fused_sgd_hist_and_noncontiguous():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(30, 40, generator=g)
    p_nc = base.t()  # non-contiguous param, must be updated in place through the view
    ps = [p_nc, torch.randn(5, 6, 7, 2, generator=g).to(memory_format=torch.channels_last)]
    gs = [torch.randn(p.shape, generator=g) for p in ps]
    bs = [torch.zeros(p.shape) for p in ps]
    want = [sgd_plain(p, gg, b, 0.2, 0.5, 0.0) for p, gg, b in zip(ps, gs, bs)]
    hist = torch.zeros(4096, dtype=torch.int64)
    hist[3] = 5  # accumulated into, not overwritten
    ops.fused_sgd_(ps, gs, bs, 0.2, 0.5, 0.0, hist)
    assert torch.allclose(base.t(), want[0][0], atol=1e-6)
    for p, b, (wp, wb) in zip(ps, bs, want):
        assert torch.allclose(p, wp, atol=1e-6) and torch.allclose(b, wb, atol=1e-6)
    expect = ops.radix_histogram(ps, 19, 12, 0, 31)
    expect[3] += 5
    assert torch.equal(hist, expect)


def test_fused_sgd_no_momentum_buffers():
    p, gg = torch.randn(50), torch.randn(50)
    want = p - 0.1 * (gg + 0.01 * p)
    ops.fused_sgd_([p], [gg], [], 0.1, 0.0, 0.01, None)
    assert torch.allclose(p, want, atol=1e-6)
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        ops.fused_sgd_([p], [gg], [], 0.1, 0.9, 0.0, None)
    with pytest.raises(RuntimeError, match="grads"):
        ops.fused_sgd_([p], [], [torch.zeros(50)], 0.1, 0.9, 0.0, None)


# ----------------------------------------------------------------------------- opcheck
def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_all_ops():
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(8, 3, generator=g), torch.randint(-2, 3, (17,), generator=g).float()]
    _opcheck(ops.topk_masks.default, (xs, 9))
    h = ops.radix_histogram(xs, 19, 12, 0, 31)
    _opcheck(ops.topk_masks_hist.default, (xs, 9, h))
    _opcheck(ops.radix_histogram.default, (xs, 7, 12, int(keys_of(xs)[0] >> 19), 19))
    theta = torch.randn(6, 4, generator=g)
    mask = torch.rand(6, 4, generator=g) > 0.5
    _opcheck(ops.masked_weight.default, (theta, mask))
    _opcheck(ops.masked_weight_backward.default,
             (torch.randn(6, 4), theta, mask, torch.randn(6, 4), 1.0, True, True))
    _opcheck(ops.masked_weight_backward.default,
             (torch.randn(6, 4), theta, mask, torch.randn(6, 4), 0.0, False, True))
    ps = [torch.randn(5, 3), torch.randn(4)]
    _opcheck(ops.fused_sgd_.default,
             (ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
              0.1, 0.9, 1e-4, torch.zeros(4096, dtype=torch.int64)))
    _opcheck(ops.fused_sgd_.default,
             (ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
              0.1, 0.9, 1e-4, None))
