"""Triton masked-weight kernels (forward, backward with score gradient) against plain PyTorch."""

import pytest
import torch

from _triton_helpers import DEV, DTYPES, _err, bt, needs_triton


pytestmark = [needs_triton, pytest.mark.usefixtures("triton_registered")]


# ------------------------------------------------------------------------------------------
# masked weight
# ------------------------------------------------------------------------------------------
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
