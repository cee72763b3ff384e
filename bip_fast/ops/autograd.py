"""autograd.Function wrappers of the differentiable ops."""

from __future__ import annotations

from typing import Optional

import torch


class MaskedWeightFn(torch.autograd.Function):
    """z = m ⊙ θ with the straight-through backward of SPEC §3.

    Inputs: weight θ, scores s, bool mask m, ig_scale (1/γ), backend name or None.
    backward(g) -> (m ⊙ g, sign(s) ⊙ (θ ⊙ g − ig_scale · m ⊙ g ⊙ g), None, None, None), both
    computed by one fused kernel; an output whose input needs no gradient is not computed.
    """

    @staticmethod
    def forward(weight, scores, mask, ig_scale: float, backend: Optional[str]):
        from . import masked_weight_forward

        return masked_weight_forward(weight, mask, backend=backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, scores, mask, ig_scale, backend = inputs
        ctx.save_for_backward(weight, scores, mask)
        ctx.ig_scale = ig_scale
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad):
        from . import masked_weight_backward

        weight, scores, mask = ctx.saved_tensors
        need_theta, need_scores = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_theta or need_scores):
            return None, None, None, None, None
        if grad.dtype != weight.dtype:
            grad = grad.to(weight.dtype)
        dtheta, dscores = masked_weight_backward(
            grad, weight, mask, scores, ctx.ig_scale, need_theta, need_scores, backend=ctx.backend
        )
        return (dtheta if need_theta else None), (dscores if need_scores else None), None, None, None
