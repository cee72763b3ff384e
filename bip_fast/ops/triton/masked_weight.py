# Masked weight z = mask * theta and its BiP backward (Triton, elementwise).
#
# Forward: z = theta * mask, in theta's dtype (mask is bool, same shape).
# Backward, from g = dl/dz (SPEC section 3, design.md masked_weight_backward):
#   dtheta  = mask * g                                        (dtype of theta)
#   gscores = sgn(s) * (theta * g - ig_scale * mask * g * g)  (float32 math, dtype of scores)
# with sgn(0) = +1. Either output can be skipped (constexpr flags, empty tensor returned).
#
# Traffic per element: forward reads b + 1 bytes and writes b (b = bytes of theta's dtype);
# backward reads g, theta, mask, s (b + b + 1 + 4 for fp32 scores) and writes up to b + 4.
# A handful of FLOPs per element: purely bandwidth bound, one launch per call.
#
# Limits / trade-offs: inputs are made contiguous (a copy for non-contiguous ones) and outputs
# are contiguous; for a conv weight in channels_last the copy costs one extra read+write. The
# masked linear layer does not use these kernels: masked_linear.py applies the mask inside its
# matmul tiles and fuses this backward into the weight-gradient epilogue.

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import launch, register_triton_op

BLOCK = 1024


@triton.jit
def _masked_weight_kernel(theta_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    th = tl.load(theta_ptr + offs, mask=inb, other=0.0)
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    tl.store(out_ptr + offs, tl.where(m, th, tl.zeros_like(th)), mask=inb)


@triton.jit
def _masked_weight_bwd_kernel(
    grad_ptr, theta_ptr, mask_ptr, scores_ptr, dtheta_ptr, gscores_ptr, ig_scale, n,
    NEED_THETA: tl.constexpr, NEED_SCORES: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    if NEED_THETA:
        dth = tl.where(m, g, 0.0)
        tl.store(dtheta_ptr + offs, dth.to(dtheta_ptr.dtype.element_ty), mask=inb)
    if NEED_SCORES:
        th = tl.load(theta_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        s = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ig = tl.where(m, ig_scale * g * g, 0.0)
        dm = th * g - ig
        gs = tl.where(s < 0.0, -dm, dm)  # sgn(0) = +1
        tl.store(gscores_ptr + offs, gs.to(gscores_ptr.dtype.element_ty), mask=inb)


def masked_weight_triton(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    theta_c = theta.contiguous()
    mask_c = mask.contiguous()
    out = torch.empty(theta.shape, dtype=theta.dtype, device=theta.device)
    n = theta_c.numel()
    if n:
        launch(
            _masked_weight_kernel, (triton.cdiv(n, BLOCK),),
            theta_c, mask_c, out, n, BLOCK=BLOCK
        )
    return out


def masked_weight_backward_triton(
    grad: torch.Tensor,
    theta: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    ig_scale: float,
    need_theta: bool,
    need_scores: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    dev = grad.device
    g = grad.contiguous()
    th = theta.contiguous()
    m = mask.contiguous()
    s = scores.contiguous()
    n = g.numel()
    if need_theta:
        dtheta = torch.empty(theta.shape, dtype=theta.dtype, device=dev)
    else:
        dtheta = torch.empty(0, dtype=theta.dtype, device=dev)
    if need_scores:
        gscores = torch.empty(scores.shape, dtype=scores.dtype, device=dev)
    else:
        gscores = torch.empty(0, dtype=scores.dtype, device=dev)
    if n and (need_theta or need_scores):
        launch(
            _masked_weight_bwd_kernel, (triton.cdiv(n, BLOCK),),
            g, th, m, s, dtheta, gscores, float(ig_scale), n,
            NEED_THETA=bool(need_theta), NEED_SCORES=bool(need_scores), BLOCK=BLOCK,
        )
    return dtheta, gscores


_ops = {}


def register() -> None:
    if _ops:
        return
    _ops["masked_weight"] = register_triton_op(
        "bip_fast::masked_weight_triton", masked_weight_triton, mutates_args=()
    )
    _ops["masked_weight_backward"] = register_triton_op(
        "bip_fast::masked_weight_backward_triton", masked_weight_backward_triton, mutates_args=()
    )
