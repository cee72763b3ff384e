"""Triton kernels against plain-PyTorch computations (CPU interpreter when there is no GPU).

Discrete outputs (masks, histograms) must be bit-equal, with ties on purpose; floating outputs
follow the house rule: error vs float64 at most 2x the error of the same-dtype torch computation
plus a small atol. Shapes are tiny because the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from bip_fast.ops import triton as bt  # noqa: E402

_OK, _REASON = bt.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_REASON}")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    if _OK:
        bt.register()


# ------------------------------------------------------------------------------------------
# plain-torch references (written here so that the test does not depend on other backends)
# ------------------------------------------------------------------------------------------
from plain_ref import hist_plain, keys_of, topk_plain  # noqa: E402


def assert_masks_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.bool, f"mask {i}: dtype {g.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"mask {i}: shape {tuple(g.shape)}"
        assert torch.equal(g.cpu(), w), f"mask {i} differs at {(g.cpu() != w).nonzero()[:5].tolist()}"


def make_scores(kind, dtype, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shp in shapes:
        if kind == "ties":  # few distinct integer magnitudes, both signs and zeros
            s = torch.randint(-4, 5, shp, generator=gen).float()
        elif kind == "equal":
            s = torch.full(shp, -1.5)
        else:
            s = torch.randn(shp, generator=gen)
        out.append(s.to(dtype).to(DEV))
    return out


SHAPES = [(5, 7), (3000,), (4, 3, 3, 3)]


# ------------------------------------------------------------------------------------------
# package behaviour
# ------------------------------------------------------------------------------------------
def test_available_and_register_idempotent():
    ok, reason = bt.available()
    assert ok is True and reason == ""
    bt.register()
    bt.register()
    for name in ("topk_masks_triton", "topk_masks_hist_triton", "radix_histogram_triton",
                 "masked_weight_triton", "masked_weight_backward_triton", "fused_sgd_triton_",
                 "masked_linear_fwd_triton", "masked_linear_bwd_input_triton",
                 "masked_linear_bwd_weight_triton"):
        assert hasattr(torch.ops.bip_fast, name), name


def test_import_without_triton_reports_reason():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import bip_fast.ops.triton as bt\n"
        "ok, reason = bt.available()\n"
        "assert ok is False and 'triton' in reason, (ok, reason)\n"
        "try:\n"
        "    bt.register()\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('register() should raise')\n"
        "print('OK')\n"
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# radix histogram and top-K masks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_passes(dtype):
    scores = make_scores("randn", dtype, SHAPES, seed=1)
    keys = keys_of(scores)
    top = int(keys.max())
    cases = [
        (19, 12, 0, 31),                 # D1, all elements
        (7, 12, top >> 19, 19),          # D2 under the top D1 bucket
        (0, 7, top >> 7, 7),             # D3 under the top 25-bit prefix
        (7, 12, 12345, 19),              # prefix that matches nothing
    ]
    for shift, bits, prefix, pshift in cases:
        got = bt.radix_histogram_triton(scores, shift, bits, prefix, pshift)
        assert got.dtype == torch.int64 and got.shape == (4096,)
        assert torch.equal(got.cpu(), hist_plain(scores, shift, bits, prefix, pshift)), (shift, prefix)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["ties", "equal", "randn"])
def test_topk_masks_bit_equal(kind, dtype):
    scores = make_scores(kind, dtype, SHAPES)
    n = sum(s.numel() for s in scores)
    for keep in (0, 1, 40, n // 2, n - 1, n):
        got = bt.topk_masks_triton(scores, keep)
        assert sum(int(m.sum()) for m in got) == keep
        assert_masks_equal(got, topk_plain(scores, keep))


def test_topk_masks_ties_span_tensors_and_blocks():
    # Many equal keys across several tensors, across the 2048-element count blocks and across
    # several 8192-element histogram programs: the kept ties must be exactly the first ones in
    # (tensor, flat index) order.
    s0 = torch.full((7,), 2.0)
    s1 = torch.full((20000,), -2.0)
    s1[::3] = 3.0
    s2 = torch.full((9,), 2.0)
    scores = [s.to(DEV) for s in (s0, s1, s2)]
    big = int((s1 == 3.0).sum())
    for keep in (big + 1, big + 7, big + 8, big + 2500, big + 13000):
        assert_masks_equal(bt.topk_masks_triton(scores, keep), topk_plain(scores, keep))


def test_topk_masks_special_values():
    # signed zeros, subnormals, and values differing only in the last digits of the key
    s = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 1.0000001, 3e38, -3e38, 2.0 ** -126])
    scores = [s.to(DEV), s.flip(0).to(DEV)]
    for keep in range(0, 21):
        assert_masks_equal(bt.topk_masks_triton(scores, keep), topk_plain(scores, keep))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_topk_masks_non_contiguous(layout):
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (6, 5, 3, 4), generator=gen).float().to(DEV)
    if layout == "transposed":
        s = base.reshape(30, 12).t()
    elif layout == "channels_last":
        s = base.contiguous(memory_format=torch.channels_last)
    else:
        s = base[:, ::2, 1:, :]
    other = torch.randint(-3, 4, (50,), generator=gen).float().to(DEV)
    scores = [s, other]
    n = s.numel() + other.numel()
    for keep in (1, 17, n // 2, n - 1):
        assert_masks_equal(bt.topk_masks_triton(scores, keep), topk_plain(scores, keep))


def test_topk_masks_hist_matches():
    scores = make_scores("ties", torch.float32, [(33,), (2, 40)] + [(0,)], seed=5)
    hist1 = bt.radix_histogram_triton(scores, 19, 12, 0, 31)
    n = sum(s.numel() for s in scores)
    for keep in (0, 1, 50, n - 1, n):
        got = bt.topk_masks_hist_triton(scores, keep, hist1)
        assert_masks_equal(got, topk_plain(scores, keep))


# ------------------------------------------------------------------------------------------
# masked weight
# ------------------------------------------------------------------------------------------
def _err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_weight_forward_backward(dtype):
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(6, 5, 3, generator=gen).to(dtype).to(DEV)
    mask = (torch.rand(6, 5, 3, generator=gen) < 0.5).to(DEV)
    scores = torch.randn(6, 5, 3, generator=gen).to(DEV)
    scores[0, 0, :] = 0.0  # sgn(0) = +1
    scores[1, 0, 0] = -0.0
    grad = torch.randn(6, 5, 3, generator=gen).to(dtype).to(DEV)
    ig = 0.75

    z = bt.masked_weight_triton(theta, mask)
    assert z.dtype == dtype and torch.equal(z, torch.where(mask, theta, torch.zeros_like(theta)))

    dth, gs = bt.masked_weight_backward_triton(grad, theta, mask, scores, ig, True, True)
    assert dth.dtype == dtype and gs.dtype == torch.float32
    assert torch.equal(dth, torch.where(mask, grad, torch.zeros_like(grad)))
    g64, t64 = grad.double(), theta.double()
    sg = torch.where(scores < 0, -1.0, 1.0).double()
    ref = sg * (t64 * g64 - ig * mask.double() * g64 * g64)
    assert _err(gs, ref) <= 1e-6 * ref.abs().max().item() + 1e-7

    d_only, empty = bt.masked_weight_backward_triton(grad, theta, mask, scores, ig, True, False)
    assert empty.numel() == 0 and torch.equal(d_only, dth)
    empty2, s_only = bt.masked_weight_backward_triton(grad, theta, mask, scores, ig, False, True)
    assert empty2.numel() == 0 and torch.equal(s_only, gs)


def test_masked_weight_non_contiguous():
    gen = torch.Generator().manual_seed(8)
    theta = torch.randn(4, 3, 2, 5, generator=gen).to(DEV).contiguous(memory_format=torch.channels_last)
    mask = (torch.rand(4, 3, 2, 5, generator=gen) < 0.5).to(DEV)
    scores = torch.randn(5, 2, 3, 4, generator=gen).to(DEV).permute(3, 2, 1, 0)
    grad = torch.randn(4, 3, 2, 5, generator=gen).to(DEV).transpose(1, 2).contiguous().transpose(1, 2)
    z = bt.masked_weight_triton(theta, mask)
    assert torch.equal(z, theta * mask)
    dth, gs = bt.masked_weight_backward_triton(grad, theta, mask, scores, 0.0, True, True)
    assert torch.equal(dth, grad * mask)
    sg = torch.where(scores < 0, -1.0, 1.0)
    assert torch.allclose(gs, sg * theta * grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# fused SGD
# ------------------------------------------------------------------------------------------
def sgd_plain(p, g, b, lr, mom, wd):
    p32, g32, b32 = p.float(), g.float(), b.float()
    d = g32 + wd * p32
    b32 = mom * b32 + d
    p32 = p32 - lr * b32
    return p32, b32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hist", [False, True])
def test_fused_sgd(dtype, with_hist):
    gen = torch.Generator().manual_seed(11)
    shapes = [(3, 4, 3, 3), (37,), (2, 9)]
    params = [torch.randn(s, generator=gen).to(dtype).to(DEV) for s in shapes]
    params[0] = params[0].contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(s, generator=gen).to(dtype).to(DEV) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(dtype).to(DEV) for s in shapes]
    bufs[2] = bufs[2].t().contiguous().t()  # a layout that differs from its param's
    lr, mom, wd = 0.1, 0.9, 1e-2
    want = [sgd_plain(p, g, b, lr, mom, wd) for p, g, b in zip(params, grads, bufs)]
    hist = torch.zeros(4096, dtype=torch.int64, device=DEV) if with_hist else None
    p_ids = [p.data_ptr() for p in params]
    bt.fused_sgd_triton_(params, grads, bufs, lr, mom, wd, hist)
    assert [p.data_ptr() for p in params] == p_ids  # in place
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for (wp, wb), p, b in zip(want, params, bufs):
        assert p.dtype == dtype and b.dtype == dtype
        # one rounding of the fp32 result to the storage dtype (plus fp32 fma slack)
        assert torch.allclose(p.float(), wp, rtol=tol, atol=1e-6)
        assert torch.allclose(b.float(), wb, rtol=tol, atol=1e-6)
    if with_hist:
        assert torch.equal(hist.cpu(), hist_plain(params, 19, 12, 0, 31))


def test_fused_sgd_hist_feeds_topk():
    gen = torch.Generator().manual_seed(12)
    params = [torch.randn(s, generator=gen).to(DEV) for s in [(20, 3), (41,)]]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    hist = torch.zeros(4096, dtype=torch.int64, device=DEV)
    bt.fused_sgd_triton_(params, grads, bufs, 0.5, 0.0, 0.0, hist)
    for b, g in zip(bufs, grads):  # momentum 0, no weight decay: the buffer is the gradient
        assert torch.equal(b, g)
    for keep in (1, 30, 100):
        assert_masks_equal(bt.topk_masks_hist_triton(params, keep, hist), topk_plain(params, keep))


# ------------------------------------------------------------------------------------------
# masked linear
# ------------------------------------------------------------------------------------------
def _linear_case(dtype, x_shape, n_out, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=gen).to(dtype).to(DEV)
    w = (torch.randn(n_out, k, generator=gen) / k ** 0.5).to(dtype).to(DEV)
    s = torch.randn(n_out, k, generator=gen).to(DEV)
    s[0, :3] = 0.0
    m = (torch.rand(n_out, k, generator=gen) < 0.6).to(DEV)
    b = torch.randn(n_out, generator=gen).to(dtype).to(DEV) if bias else None
    gy = torch.randn(*x_shape[:-1], n_out, generator=gen).to(dtype).to(DEV)
    return x, w, s, m, b, gy


def _linear_grads(x, w, s, m, b, gy, ig):
    """Same-dtype torch computation: y, gx, dw, ds, gb (autograd through an explicit mask)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    bb = b.detach().requires_grad_() if b is not None else None
    z = w * m
    z.retain_grad()
    y = torch.nn.functional.linear(x, z, bb)
    y.backward(gy)
    G = z.grad.float()
    dw = w.grad
    sg = torch.where(s < 0, -1.0, 1.0)
    ds = sg * (w.float() * G - ig * m.float() * G * G)
    return y.detach(), x.grad, dw, ds.to(s.dtype), (bb.grad if bb is not None else None)


def _check_close(name, got, ref64, torch_same, atol_rel):
    e_fast = _err(got, ref64)
    e_torch = _err(torch_same, ref64)
    scale = max(ref64.abs().max().item(), 1.0)
    assert e_fast <= 2 * e_torch + atol_rel * scale, (name, e_fast, e_torch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", [((2, 5, 40), 24, True), ((33, 20), 7, False), ((70, 100), 65, True)]
)
def test_masked_linear_fwd_bwd(dtype, case):
    x_shape, n_out, bias = case
    ig = 0.5
    x, w, s, m, b, gy = _linear_case(dtype, x_shape, n_out, bias)
    xt = x.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    st = s.clone().requires_grad_()
    bt_ = b.clone().requires_grad_() if b is not None else None
    y = bt.masked_linear_triton(xt, wt, m, st, bt_, ig)
    assert y.shape == (*x_shape[:-1], n_out) and y.dtype == dtype
    y.backward(gy)
    ref64 = _linear_grads(x.double(), w.double(), s.double(), m, None if b is None else b.double(),
                          gy.double(), ig)
    same = _linear_grads(x, w, s, m, b, gy, ig)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    got = (y, xt.grad, wt.grad, st.grad, bt_.grad if bt_ is not None else None)
    for name, g_, r_, t_ in zip(("y", "gx", "dw", "ds", "gb"), got, ref64, same):
        if r_ is None:
            assert g_ is None
            continue
        assert g_.dtype == t_.dtype, (name, g_.dtype, t_.dtype)
        _check_close(name, g_, r_, t_, atol)
    assert st.grad.dtype == torch.float32
    # pruned weights get no weight gradient
    assert torch.all(wt.grad[~m] == 0)


def test_masked_linear_partial_grads_and_non_contiguous():
    x, w, s, m, b, gy = _linear_case(torch.float32, (6, 40), 20, True, seed=3)
    x_nc = x.t().contiguous().t()  # column-major view of the same values
    wt = w.clone().requires_grad_()
    y = bt.masked_linear_triton(x_nc, wt, m, s, b, 1.0)  # only weight requires grad
    y.backward(gy)
    ref = _linear_grads(x.double(), w.double(), s.double(), m, b.double(), gy.double(), 1.0)
    same = _linear_grads(x, w, s, m, b, gy, 1.0)
    _check_close("y", y, ref[0], same[0], 1e-5)
    _check_close("dw", wt.grad, ref[2], same[2], 1e-5)
    # scores=None: plain masked linear, scores get nothing
    st = s.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    y2 = bt.masked_linear_triton(xt, w, m, None, None, 0.0)
    y2.backward(gy)
    assert st.grad is None
    _check_close("gx", xt.grad, ref[1], same[1], 1e-5)


# ------------------------------------------------------------------------------------------
# torch.library.opcheck on every registered op (smallest shapes)
# ------------------------------------------------------------------------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_topk_and_histogram():
    ops = torch.ops.bip_fast
    scores = make_scores("ties", torch.float32, [(3, 4), (5,)], seed=2)
    _opcheck(ops.radix_histogram_triton.default, (scores, 19, 12, 0, 31))
    _opcheck(ops.topk_masks_triton.default, (scores, 6))
    hist1 = bt.radix_histogram_triton(scores, 19, 12, 0, 31)
    _opcheck(ops.topk_masks_hist_triton.default, (scores, 6, hist1))


def test_opcheck_masked_weight_and_sgd():
    ops = torch.ops.bip_fast
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(3, 4, generator=gen).to(DEV)
    m = (torch.rand(3, 4, generator=gen) < 0.5).to(DEV)
    s = torch.randn(3, 4, generator=gen).to(DEV)
    g = torch.randn(3, 4, generator=gen).to(DEV)
    _opcheck(ops.masked_weight_triton.default, (t, m))
    _opcheck(ops.masked_weight_backward_triton.default, (g, t, m, s, 0.5, True, True))
    _opcheck(ops.masked_weight_backward_triton.default, (g, t, m, s, 0.5, False, True))
    params = [t.clone(), s.clone()]
    _opcheck(ops.fused_sgd_triton_.default,
             (params, [g, g], [torch.zeros_like(t), torch.zeros_like(s)], 0.1, 0.9, 1e-4,
              torch.zeros(4096, dtype=torch.int64, device=DEV)))
    _opcheck(ops.fused_sgd_triton_.default,
             (params, [g, g], [torch.zeros_like(t), torch.zeros_like(s)], 0.1, 0.9, 1e-4, None))


def test_opcheck_masked_linear():
    ops = torch.ops.bip_fast
    x, w, s, m, b, gy = _linear_case(torch.float32, (4, 8), 5, True, seed=6)
    _opcheck(ops.masked_linear_fwd_triton.default, (x, w, m, b))
    _opcheck(ops.masked_linear_fwd_triton.default, (x, w, m, None))
    _opcheck(ops.masked_linear_bwd_input_triton.default, (gy, w, m))
    _opcheck(ops.masked_linear_bwd_weight_triton.default, (gy, x, w, m, s, 0.5, True, True))


# ------------------------------------------------------------------------------------------
# torch.compile traces the ops (aot_eager: no inductor codegen needed on CPU)
# ------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    scores = [torch.randn(4, 5, generator=gen).to(DEV), torch.randn(9, generator=gen).to(DEV)]
    p = torch.randn(10, generator=gen).to(DEV)
    g = torch.randn(10, generator=gen).to(DEV)
    b = torch.zeros(10, device=DEV)
    hist = torch.zeros(4096, dtype=torch.int64, device=DEV)

    def step(scores, p, g, b, hist):
        bt.fused_sgd_triton_([p], [g], [b], 0.1, 0.9, 0.0, hist)
        return bt.topk_masks_hist_triton(scores, 7, bt.radix_histogram_triton(scores, 19, 12, 0, 31))

    want_p, want_b = sgd_plain(p, g, b, 0.1, 0.9, 0.0)
    masks = torch.compile(step, backend="aot_eager", fullgraph=True)(scores, p, g, b, hist)
    assert_masks_equal(masks, topk_plain(scores, 7))
    assert torch.allclose(p, want_p, rtol=1e-6, atol=1e-7) and torch.allclose(b, want_b)
    assert torch.equal(hist.cpu(), hist_plain([p], 19, 12, 0, 31))

    x, w, s, m, _, _ = _linear_case(torch.float32, (3, 8), 5, False, seed=10)
    w.requires_grad_()
    s.requires_grad_()
    loss = torch.compile(lambda x, w, s: bt.masked_linear_triton(x, w, m, s, None, 1.0).sum(),
                         backend="aot_eager", fullgraph=True)
    loss(x, w, s).backward()
    G = x.sum(0).expand(5, 8)
    assert torch.allclose(w.grad, m * G, rtol=1e-5, atol=1e-6)
    sg = torch.where(s.detach() < 0, -1.0, 1.0)
    assert torch.allclose(s.grad, sg * (w.detach() * G - m * G * G), rtol=1e-5, atol=1e-5)
