"""autograd.Function wrappers of the differentiable ops."""

from __future__ import annotations

import torch

from ._impl import _masked_weight_backward_impl, _masked_weight_impl


class MaskedWeightFn(torch.autograd.Function):
    """z = m ⊙ θ with the straight-through backward of SPEC §3.

    Inputs: weight θ, scores s, bool mask m, ig_scale (1/γ) and a *resolved* backend name (the
    public :func:`bip_fast.ops.masked_weight` validates and resolves once per call, so the hot
    path here does no further checking). backward(g) -> (m ⊙ g, sign(s) ⊙ (θ ⊙ g − ig_scale ·
    m ⊙ g ⊙ g)) from one fused kernel; an output whose input needs no gradient is not computed.
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, ig_scale: float, backend: str):
        ctx.save_for_backward(weight, scores, mask)
        ctx.ig_scale = ig_scale
        ctx.backend = backend
        return _masked_weight_impl(backend, weight, mask)

    @staticmethod
    def backward(ctx, grad):
        weight, scores, mask = ctx.saved_tensors
        need_theta, need_scores = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_theta or need_scores):
            return None, None, None, None, None
        if grad.dtype != weight.dtype:
            grad = grad.to(weight.dtype)
        dtheta, dscores = _masked_weight_backward_impl(
            ctx.backend, grad, weight, mask, scores, ctx.ig_scale, need_theta, need_scores
        )
        return (dtheta if need_theta else None), (dscores if need_scores else None), None, None, None
