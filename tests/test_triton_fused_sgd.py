"""Triton fused SGD kernel (with the optional radix histogram) against plain PyTorch."""

import pytest
import torch

from _triton_helpers import DEV, DTYPES, assert_masks_equal, bt, needs_triton, sgd_plain
from plain_ref import hist_plain, topk_plain


pytestmark = [needs_triton, pytest.mark.usefixtures("triton_registered")]


# ------------------------------------------------------------------------------------------
# fused SGD
# ------------------------------------------------------------------------------------------
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
