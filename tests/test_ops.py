"""Every available backend against the pure-PyTorch reference (bip_fast.ops.reference)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bip_fast
from bip_fast import ops
from bip_fast.ops import reference as ref

CPU_BACKENDS = ops.available_backends("cpu")
FAST = [b for b in CPU_BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends_or_skip():
    if not FAST:
        pytest.skip("no compiled or Triton backend usable on CPU here")
    return FAST


def _examples(backend):
    # The Triton interpreter is slow: fewer fuzzed examples there.
    return 8 if backend == "triton" else 40


def _make_scores(shapes, kind, dtype, gen):
    out = []
    for shp in shapes:
        if kind == "int":
            t = torch.randint(-4, 5, shp, generator=gen).to(dtype)
        elif kind == "equal":
            t = torch.full(shp, 0.5, dtype=dtype)
        else:
            t = torch.randn(shp, generator=gen).to(dtype)
        out.append(t)
    return out


shape_st = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 40)),
        st.tuples(st.integers(1, 9), st.integers(1, 9)),
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("backend", FAST or ["none"])
@pytest.mark.parametrize("kind", ["randn", "int", "equal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_masks_matches_reference(backend, kind, dtype):
    if backend == "none":
        _backends_or_skip()

    @settings(max_examples=_examples(backend), deadline=None, suppress_health_check=list(HealthCheck))
    @given(shapes=shape_st, frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), edge=st.sampled_from([None, 0, 1, -1, "N"]))
    def run(shapes, frac, seed, edge):
        gen = torch.Generator().manual_seed(seed)
        scores = _make_scores(shapes, kind, dtype, gen)
        n = sum(s.numel() for s in scores)
        keep = {None: int(frac * n), 0: 0, 1: min(1, n), -1: max(n - 1, 0), "N": n}[edge]
        got = ops.topk_masks(scores, keep, backend=backend)
        want = ref.topk_masks_ref(scores, keep)
        assert sum(int(g.sum()) for g in got) == keep
        for g, w, s in zip(got, want, scores):
            assert g.dtype == torch.bool and g.shape == s.shape
            assert torch.equal(g, w)

    run()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_masks_layouts(backend):
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-3, 4, (6, 5, 3, 3), generator=gen).float().contiguous(memory_format=torch.channels_last)
    b = torch.randn(7, 9, generator=gen).t()  # non-contiguous
    c = torch.randn(20, generator=gen)[::2]  # strided
    for keep in (0, 1, 17, 200, a.numel() + b.numel() + c.numel()):
        got = ops.topk_masks([a, b, c], keep, backend=backend)
        want = ref.topk_masks_ref([a.contiguous(), b.contiguous(), c.contiguous()], keep)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_topk_tie_rule_by_hand():
    a = torch.tensor([1.0, -2.0, 2.0])
    b = torch.tensor([[2.0, 3.0], [-2.0, 0.0]])
    for backend in CPU_BACKENDS:
        ma, mb = ops.topk_masks([a, b], 3, backend=backend)
        # |s| = 3 first, then the first two 2s in (tensor, index) order: a[1], a[2].
        assert ma.tolist() == [False, True, True], backend
        assert mb.tolist() == [[False, True], [False, False]], backend


def test_topk_hist_hint_and_stale_hint():
    s = [torch.randn(50), torch.randn(3, 4)]
    h = ops.radix_histogram(s, backend="reference")
    for backend in CPU_BACKENDS:
        got = ops.topk_masks(s, 20, hist1=h, backend=backend)
        want = ref.topk_masks_ref(s, 20)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="hist1"):
        ops.topk_masks(s, 20, hist1=torch.zeros(4096, dtype=torch.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pass_", [(19, 12, 0, 31), (7, 12, 0x7E0, 19), (0, 7, 0x3F0123, 7)])
def test_radix_histogram(backend, pass_):
    gen = torch.Generator().manual_seed(1)
    s = [torch.randn(300, generator=gen), torch.rand(7, 11, generator=gen).half()]
    if pass_[3] < 31:
        # aim the prefix at a real element so the filtered histogram is not empty
        key = int(ref.radix_key(s[0])[5])
        pass_ = (pass_[0], pass_[1], key >> pass_[3], pass_[3])
    got = ops.radix_histogram(s, *pass_, backend=backend)
    want = ref.radix_histogram_ref(s, *pass_)
    assert got.dtype == torch.int64 and got.shape == (4096,)
    assert torch.equal(got.cpu(), want)
    assert int(got.sum()) >= 1


def _err(x, x64):
    return (x.double() - x64).abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_masked_weight_forward_backward(backend, dtype, layout):
    gen = torch.Generator().manual_seed(2)
    shape = (5, 4, 3, 3)
    theta = torch.randn(shape, generator=gen).to(dtype)
    scores = torch.randint(-2, 3, shape, generator=gen).float()  # zeros on purpose: sgn(0) = +1
    mask = torch.rand(shape, generator=gen) > 0.4
    grad = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        theta, scores, mask, grad = (t.contiguous(memory_format=torch.channels_last) for t in (theta, scores, mask, grad))
    elif layout == "transposed":
        theta, scores, mask, grad = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (theta, scores, mask, grad))
    z = ops.masked_weight_forward(theta, mask, backend=backend)
    assert z.dtype == dtype and torch.equal(z, ref.masked_weight_ref(theta, mask))
    for ig in (0.0, 1.0, 0.37):
        dt, ds = ops.masked_weight_backward(grad, theta, mask, scores, ig, backend=backend)
        dt64, ds64 = ref.masked_weight_backward_ref(grad.double(), theta.double(), mask, scores.double(), ig)
        rt, rs = ref.masked_weight_backward_ref(grad, theta, mask, scores, ig)
        assert dt.dtype == dtype and ds.dtype == torch.float32
        assert _err(dt, dt64) <= 2 * _err(rt, dt64) + 1e-6
        assert _err(ds, ds64) <= 2 * _err(rs, ds64) + 1e-5
    dt, ds = ops.masked_weight_backward(grad, theta, mask, scores, 1.0, True, False, backend=backend)
    assert ds.numel() == 0 and dt.shape == shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_sgd_matches_reference(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(17,), (4, 5), (3, 2, 3, 3)]
    p = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    g = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    b = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    p2, b2 = [t.clone() for t in p], [t.clone() for t in b]
    h, h2 = torch.zeros(4096, dtype=torch.int64), torch.zeros(4096, dtype=torch.int64)
    ops.fused_sgd_(p, g, b, 0.1, 0.9, 1e-2, hist1=h, backend=backend)
    ref.fused_sgd_ref_(p2, g, b2, 0.1, 0.9, 1e-2, h2)
    tol = 0 if dtype == torch.float32 else 1e-2
    for x, y in zip(p + b, p2 + b2):
        torch.testing.assert_close(x, y, rtol=tol or 1e-6, atol=tol or 1e-6)
    if dtype == torch.float32:
        assert torch.equal(h, h2)
    assert int(h.sum()) == sum(t.numel() for t in p)


def test_fused_sgd_equals_torch_sgd():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 3))
    w2 = torch.nn.Parameter(w.detach().clone())
    opt = torch.optim.SGD([w2], lr=0.05, momentum=0.9, weight_decay=1e-3)
    buf = torch.zeros_like(w)
    for _ in range(3):
        grad = torch.randn(10, 3)
        w2.grad = grad.clone()
        opt.step()
        with torch.no_grad():
            ops.fused_sgd_([w.data], [grad], [buf], 0.05, 0.9, 1e-3)
    torch.testing.assert_close(w.detach(), w2.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_linear(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 12, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(7, 12, generator=gen).to(dtype).requires_grad_()
    s = torch.randn(7, 12, generator=gen).requires_grad_()
    b = torch.randn(7, generator=gen).to(dtype).requires_grad_()
    m = torch.rand(7, 12, generator=gen) > 0.5
    y = ops.masked_linear(x, w, s, m, b, 0.5, backend=backend)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(gy)
    # float64 truth and the same-dtype plain torch error
    x64, w64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, w, s, b))
    y64 = torch.nn.functional.linear(x64, w64 * m, b64)
    y64.backward(gy.double())
    g64 = (gy.double().reshape(-1, 7).t() @ x64.detach().reshape(-1, 12))
    gs64 = torch.where(s64 < 0, -1.0, 1.0).double() * (w64.detach() * g64 - 0.5 * m * g64 * g64)
    yt = torch.nn.functional.linear(x.detach(), w.detach() * m, b.detach())
    atol = 1e-5 if dtype == torch.float32 else 5e-2
    assert _err(y, y64) <= 2 * _err(yt, y64) + atol
    assert _err(x.grad, x64.grad) <= 2 * _err((gy @ (w.detach() * m)), x64.grad) + atol
    assert _err(w.grad, w64.grad) <= 2 * _err((gy.reshape(-1, 7).t() @ x.detach().reshape(-1, 12)) * m, w64.grad) + atol
    assert _err(s.grad, gs64) <= 4 * atol + 1e-4 * gs64.abs().max().item()
    assert _err(b.grad, b64.grad) <= atol * 10


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    m = torch.rand(4, 3, generator=gen) > 0.5
    f = lambda w_: ops.masked_weight(w_, s, m, 0.7, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,))
    # The score gradient is the straight-through dℓ/dm (SPEC §3) times sign(s): check it against
    # autograd of a continuous mask variable, including the IG term −(1/γ) m g².
    s.requires_grad_(True)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    z = ops.masked_weight(w, s, m, 0.7, backend="reference")
    (z @ x).pow(2).sum().backward()
    mvar = m.double().requires_grad_(True)
    zz = (w.detach() * mvar)
    (zz @ x).pow(2).sum().backward()
    zz2 = (w.detach() * m.double()).requires_grad_(True)
    (zz2 @ x).pow(2).sum().backward()
    g = zz2.grad
    expect = torch.sign(s.detach()) * (mvar.grad - 0.7 * m.double() * g * g)
    torch.testing.assert_close(s.grad, expect)
    torch.testing.assert_close(w.grad, m.double() * g)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_topk_bad_input():
    s = [torch.randn(10), torch.randn(3)]
    with pytest.raises(ValueError, match="keep"):
        ops.topk_masks(s, 14)
    with pytest.raises(ValueError, match="keep"):
        ops.topk_masks(s, -1)
    with pytest.raises(TypeError, match="keep"):
        ops.topk_masks(s, 2.5)
    with pytest.raises(TypeError, match="scores"):
        ops.topk_masks(torch.randn(3), 1)
    with pytest.raises(TypeError, match=r"scores\[1\]"):
        ops.topk_masks([torch.randn(3), torch.arange(3)], 1)
    with pytest.raises(ValueError, match="scores"):
        ops.topk_masks([], 0)
    bad = torch.randn(5)
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\].*NaN"):
        ops.topk_masks([torch.randn(3), bad], 1)
    bad[2] = float("-inf")
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        ops.topk_masks([torch.randn(3), bad], 1)
    with pytest.raises(ValueError, match="backend"):
        ops.topk_masks(s, 1, backend="nope")
    with pytest.raises(bip_fast.BackendUnavailableError, match="cuda"):
        ops.topk_masks(s, 1, backend="cuda")


def test_masked_weight_bad_input():
    w = torch.randn(4, 3)
    m = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="scores"):
        ops.masked_weight(w, torch.randn(3, 4), m)
    with pytest.raises(TypeError, match="mask"):
        ops.masked_weight(w, torch.randn(4, 3), m.float())
    with pytest.raises(ValueError, match="mask"):
        ops.masked_weight(w, torch.randn(4, 3), torch.ones(12, dtype=torch.bool))
    with pytest.raises(ValueError, match="params"):
        ops.fused_sgd_([w], [w, w], [w], 0.1)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        ops.fused_sgd_([w], [torch.randn(3)], [w.clone()], 0.1)
    with pytest.raises(ValueError, match="lr"):
        ops.fused_sgd_([w], [w.clone()], [w.clone()], float("nan"))
    with pytest.raises(ValueError, match="density"):
        ops.keep_count(10, 1.5)


def test_dispatch_rules(monkeypatch):
    s = [torch.randn(10)]
    assert "reference" in ops.available_backends("cpu")
    with bip_fast.use_backend("reference"):
        assert ops.resolve_backend("topk_masks", "cpu") == "reference"
        # an explicit argument wins over the context
        if "cpu" in CPU_BACKENDS:
            assert ops.resolve_backend("topk_masks", "cpu", "cpu") == "cpu"
    monkeypatch.setenv("BIP_FAST_BACKEND", "reference")
    assert ops.resolve_backend("topk_masks", "cpu") == "reference"
    monkeypatch.setenv("BIP_FAST_BACKEND", "cuda")
    with pytest.raises(bip_fast.BackendUnavailableError, match="BIP_FAST_BACKEND"):
        ops.topk_masks(s, 1)
    monkeypatch.delenv("BIP_FAST_BACKEND")
    # float64 routes to the reference by default, and refuses an explicit kernel backend
    assert ops.resolve_backend("masked_weight", "cpu", dtype=torch.float64) == "reference"
    if "cpu" in CPU_BACKENDS:
        with pytest.raises(bip_fast.BackendUnavailableError, match="float64"):
            ops.resolve_backend("masked_weight", "cpu", "cpu", dtype=torch.float64)
    assert math.isclose(ops.keep_count(10, 0.25), 3)  # 2.5 rounds half up
