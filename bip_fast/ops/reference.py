"""Pure-PyTorch reference implementations: the executable specification.

Every fast backend (C++ CPU, CUDA C++, Triton) is tested against these functions. They favour
clarity over speed: ``topk_masks_ref`` concatenates and sorts, which the fast kernels never do.
See SPEC §2 (projection), §3 (straight-through backward) and docs/design.md (radix key).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = [
    "KEY_MASK",
    "D1_SHIFT",
    "NONFINITE_D1",
    "radix_key",
    "radix_histogram_ref",
    "topk_masks_ref",
    "topk_masks_hist_ref",
    "masked_weight_ref",
    "masked_weight_backward_ref",
    "fused_sgd_ref_",
    "sgn",
]

KEY_MASK = 0x7FFFFFFF
D1_SHIFT = 19
HIST_BINS = 4096
# Every key >= 0x7f800000 (inf or NaN) has D1 >= 0xFF0.
NONFINITE_D1 = 0x7F800000 >> D1_SHIFT


def radix_key(x: torch.Tensor) -> torch.Tensor:
    """uint32 radix key of |x| as a non-negative int64 tensor (flattened, row-major order)."""
    bits = x.detach().reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)
    return bits & KEY_MASK


def _all_keys(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([radix_key(s) for s in scores])


def radix_histogram_ref(
    scores: Sequence[torch.Tensor], shift: int, bits: int, prefix: int, prefix_shift: int
) -> torch.Tensor:
    """Counts of the digit ``(key >> shift) & (2**bits - 1)`` over keys matching the prefix."""
    keys = _all_keys(scores)
    if prefix_shift < 31:
        keys = keys[(keys >> prefix_shift) == prefix]
    digits = (keys >> shift) & ((1 << bits) - 1)
    return torch.bincount(digits, minlength=HIST_BINS)[:HIST_BINS].to(torch.int64)


def topk_masks_ref(scores: Sequence[torch.Tensor], keep: int) -> List[torch.Tensor]:
    """Global top-``keep`` of |s| over all tensors; ties go to the earlier (tensor, flat index)."""
    keys = _all_keys(scores)
    flat = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    if keep > 0:
        # A stable descending sort keeps equal keys in their (tensor, flat index) order.
        order = torch.sort(keys, descending=True, stable=True).indices
        flat[order[:keep]] = True
    masks, start = [], 0
    for s in scores:
        masks.append(flat[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return masks


def topk_masks_hist_ref(
    scores: Sequence[torch.Tensor], keep: int, hist1: torch.Tensor
) -> List[torch.Tensor]:
    """Same as :func:`topk_masks_ref`; ``hist1`` (the D1 histogram) is only a hint."""
    del hist1
    return topk_masks_ref(scores, keep)


def sgn(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1 (SPEC §3)."""
    return torch.where(x < 0, -1.0, 1.0).to(torch.float32 if x.dtype != torch.float64 else x.dtype)


def masked_weight_ref(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z = m ⊙ θ in θ's dtype."""
    return theta * mask.to(theta.dtype)


def masked_weight_backward_ref(
    grad: torch.Tensor,
    theta: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    ig_scale: float,
    need_theta: bool = True,
    need_scores: bool = True,
):
    """(∂ℓ/∂θ, G_s) from g = ∂ℓ/∂z (SPEC §3); an output that is not needed is an empty tensor."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    m = mask.to(acc)
    dtheta = (m * g).to(theta.dtype) if need_theta else theta.new_empty(0)
    if need_scores:
        gs = sgn(scores).to(acc) * (theta.to(acc) * g - ig_scale * m * g * g)
        gscores = gs.to(scores.dtype)
    else:
        gscores = scores.new_empty(0)
    return dtheta, gscores


def fused_sgd_ref_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    hist1: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
) -> None:
    """In place: d = g + wd·p; b = μ·b + d; p = p − lr·b (PyTorch SGD, buffers start at zero).

    A true ``skip`` (one bool) keeps every value (selected on the device, no host read)."""
    with torch.no_grad():
        for p, g, b in zip(params, grads, bufs):
            p32 = p.to(torch.float32)
            d = g.to(torch.float32) + weight_decay * p32
            b32 = momentum * b.to(torch.float32) + d
            p32 = p32 - lr * b32
            if skip is not None:
                keep = skip.reshape(())
                b32 = torch.where(keep, b.to(torch.float32), b32)
                p32 = torch.where(keep, p.to(torch.float32), p32)
            b.copy_(b32)
            p.copy_(p32)
        if hist1 is not None:
            hist1 += radix_histogram_ref(params, D1_SHIFT, 12, 0, 31).to(hist1.device)
