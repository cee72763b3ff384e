"""Triton masked-linear kernels (forward, input, weight and score gradients) against float64 and same-dtype torch."""

import pytest
import torch

from _triton_helpers import DTYPES, _err, _linear_case, bt, needs_triton


pytestmark = [needs_triton, pytest.mark.usefixtures("triton_registered")]


# ------------------------------------------------------------------------------------------
# masked linear
# ------------------------------------------------------------------------------------------
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
