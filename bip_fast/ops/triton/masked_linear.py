# Masked linear layer y = x @ (mask * W)^T + bias with the BiP backward (Triton).
#
# Algorithm. Three tiled matmul kernels, fp32 accumulation, grouped (L2-friendly) tile order:
#   forward      y[M,N]  = x[M,K] @ (mask*W)^T[K,N] + bias   mask applied to each W tile as it is
#                                                             loaded (mask*W never materialised)
#   grad input   gx[M,K] = g[M,N] @ (mask*W)[N,K]             same kernel, W read untransposed
#   grad weight  G[N,K]  = g^T[N,M] @ x[M,K], reduced over M; the epilogue reads W, mask and
#                scores for its tile and writes directly
#                   dtheta  = mask * G                                   (W's dtype)
#                   gscores = sgn(s) * (W * G - ig_scale * mask * G * G) (scores' dtype, sgn(0)=+1)
#                using the fp32 accumulator G (no rounding of G, no separate elementwise pass).
#   grad bias    g.sum(0) in fp32 (torch; one read of g).
# x of shape (..., K) is flattened to (M, K). Inputs fp32 / bf16 / fp16; W and bias are converted
# to x's dtype on load. fp32 inputs use TF32 tensor cores only when
# torch.backends.cuda.matmul.allow_tf32 is set (as torch.matmul does), IEEE fp32 otherwise.
#
# FLOPs: 2MNK per matmul, 6MNK per training step (forward + two backward matmuls), like nn.Linear.
# Bytes (b = element bytes): forward reads M*K*b (x) + N*K*(b+1) (W + mask) once per tile column
# / row panel and writes M*N*b; grad weight writes N*K*(b_W + 4) and reads N*K*(b_W + 1 + 4)
# in its epilogue, which replaces the elementwise backward's separate full read/write of G.
#
# Limits / trade-offs: no split-K, so the weight-gradient kernel has only ceil(N/BN)*ceil(K/BK)
# programs and underfills an H100 for small layers with very large M (e.g. a 10x512 classifier
# head); a split-K variant would need an fp32 workspace and a second epilogue pass. Autotune
# configs are a short list aimed at H100 (under TRITON_INTERPRET a single small config); the
# epilogue recomputes the sign / IG terms per tile, which is free next to the K-loop.

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch, register_triton_op


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _configs(a: str, b: str, c: str):
    """Autotune configs over tile sizes named (a, b, c): (rows, cols, reduction)."""
    if _interpret():
        return [triton.Config({a: 32, b: 32, c: 32, "GROUP": 4}, num_warps=4, num_stages=1)]
    shapes = [
        # (rows, cols, reduction, warps, stages)
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 4),
        (32, 64, 32, 4, 3),
    ]
    return [
        triton.Config({a: r, b: cc, c: k, "GROUP": 8}, num_warps=w, num_stages=s)
        for r, cc, k, w, s in shapes
    ]


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += a @ b with the requested input precision (1: tf32, 2: ieee, else the default);
    DOT_F32 first upcasts both operands to float32."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PRECISION == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif PRECISION == 2:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile_ids(pid, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr):
    # Grouped ordering: GROUP row-tiles share each column panel while it is in L2.
    num_r = tl.cdiv(n_rows, BR)
    num_c = tl.cdiv(n_cols, BC)
    in_group = GROUP * num_c
    group_id = pid // in_group
    first_r = group_id * GROUP
    size = tl.minimum(num_r - first_r, GROUP)
    pid_r = first_r + ((pid % in_group) % size)
    pid_c = (pid % in_group) // size
    return pid_r, pid_c


@triton.autotune(configs=_configs("BM", "BN", "BK"), key=["M", "N", "R", "PRECISION", "DOT_F32"])
@triton.jit
def _masked_mm_kernel(
    a_ptr, b_ptr, bmask_ptr, bias_ptr, c_ptr,
    M, N, R,
    stride_am, stride_ar, stride_br, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):
    # C[M,N] = A[M,R] @ (mask*B)[R,N] (+ bias[N]); B and its mask share strides.
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rm = offs_m < M
    rn = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ar
    b_off = offs_k[:, None].to(tl.int64) * stride_br + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, R, BK):
        kk = k0 + offs_k
        a = tl.load(a_ptrs, mask=rm[:, None] & (kk[None, :] < R), other=0.0)
        lm = (kk[:, None] < R) & rn[None, :]
        b = tl.load(b_ptr + b_off, mask=lm, other=0.0)
        keep = tl.load(bmask_ptr + b_off, mask=lm, other=0) != 0
        b = tl.where(keep, b, tl.zeros_like(b)).to(a.dtype)
        acc = _mma(a, b, acc, PRECISION, DOT_F32)
        a_ptrs += BK * stride_ar
        b_off += BK * stride_br
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=rn, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rm[:, None] & rn[None, :])


@triton.autotune(configs=_configs("BN", "BK", "BM"), key=["M", "N", "K", "PRECISION", "DOT_F32"])
@triton.jit
def _masked_linear_wgrad_kernel(
    g_ptr, x_ptr, w_ptr, mask_ptr, s_ptr, dw_ptr, ds_ptr,
    M, N, K, ig_scale,
    stride_gm, stride_gn, stride_xm, stride_xk,
    NEED_THETA: tl.constexpr, NEED_SCORES: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, GROUP: tl.constexpr,
):
    # G[N,K] = g^T @ x over M, then the BiP epilogue. W, mask, scores, dW, dS: contiguous [N,K].
    pid_n, pid_k = _tile_ids(tl.program_id(0), N, K, BN, BK, GROUP)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_m = tl.arange(0, BM)
    rn = offs_n < N
    rk = offs_k < K
    gt_ptrs = g_ptr + offs_n[:, None] * stride_gn + offs_m[None, :].to(tl.int64) * stride_gm
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for m0 in range(0, M, BM):
        mm = m0 + offs_m
        gt = tl.load(gt_ptrs, mask=rn[:, None] & (mm[None, :] < M), other=0.0)
        xt = tl.load(x_ptrs, mask=(mm[:, None] < M) & rk[None, :], other=0.0).to(gt.dtype)
        acc = _mma(gt, xt, acc, PRECISION, DOT_F32)
        gt_ptrs += BM * stride_gm
        x_ptrs += BM * stride_xm
    wk = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    inb = rn[:, None] & rk[None, :]
    keep = tl.load(mask_ptr + wk, mask=inb, other=0) != 0
    if NEED_THETA:
        tl.store(dw_ptr + wk, tl.where(keep, acc, 0.0).to(dw_ptr.dtype.element_ty), mask=inb)
    if NEED_SCORES:
        w = tl.load(w_ptr + wk, mask=inb, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + wk, mask=inb, other=0.0).to(tl.float32)
        dm = w * acc - tl.where(keep, ig_scale * acc * acc, 0.0)
        ds = tl.where(s < 0.0, -dm, dm)  # sgn(0) = +1
        tl.store(ds_ptr + wk, ds.to(ds_ptr.dtype.element_ty), mask=inb)


def _precision(x: torch.Tensor) -> int:
    """tl.dot input precision code: 0 default (fp16/bf16 operands), 1 tf32, 2 ieee fp32."""
    if x.dtype != torch.float32:
        return 0
    return 1 if x.is_cuda and bool(torch.backends.cuda.matmul.allow_tf32) else 2


def _dot_f32(x: torch.Tensor) -> bool:
    # The Triton CPU interpreter multiplies bf16 operands as their raw uint16 bits; upcast them
    # (exact: bf16 products are exact in fp32, and the accumulator is fp32 anyway).
    return x.dtype == torch.bfloat16 and _interpret()


def _mm_grid(rows: int, cols: int, br: str, bc: str):
    return lambda meta: (triton.cdiv(rows, meta[br]) * triton.cdiv(cols, meta[bc]),)


def masked_linear_fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """y[M,N] = x[M,K] @ (mask*weight)^T + bias, x 2-D."""
    M, K = x.shape
    N = weight.shape[0]
    w = weight.contiguous()
    m = mask.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        if bias is None:
            return y.zero_()
        return y.copy_(bias.to(x.dtype).expand(M, N))
    has_bias = bias is not None
    launch(
        _masked_mm_kernel, _mm_grid(M, N, "BM", "BN"),
        x, w, m, bias if has_bias else w, y,
        M, N, K,
        x.stride(0), x.stride(1), w.stride(1), w.stride(0), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, PRECISION=_precision(x), DOT_F32=_dot_f32(x),
    )
    return y


def masked_linear_bwd_input_triton(
    grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """gx[M,K] = grad[M,N] @ (mask*weight)[N,K], grad 2-D."""
    M, N = grad.shape
    K = weight.shape[1]
    w = weight.contiguous()
    m = mask.contiguous()
    gx = torch.empty((M, K), dtype=grad.dtype, device=grad.device)
    if M == 0 or K == 0:
        return gx
    if N == 0:
        return gx.zero_()
    launch(
        _masked_mm_kernel, _mm_grid(M, K, "BM", "BN"),
        grad, w, m, w, gx,
        M, K, N,
        grad.stride(0), grad.stride(1), w.stride(0), w.stride(1), gx.stride(0), gx.stride(1),
        HAS_BIAS=False, PRECISION=_precision(grad), DOT_F32=_dot_f32(grad),
    )
    return gx


def masked_linear_bwd_weight_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    ig_scale: float,
    need_theta: bool,
    need_scores: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask*G, sgn(s)*(weight*G - ig_scale*mask*G^2)) with G = grad^T @ x; empty if not needed."""
    M, N = grad.shape
    K = x.shape[1]
    dev = grad.device
    w = weight.contiguous()
    m = mask.contiguous()
    s = scores.contiguous()
    dw = torch.empty((N, K) if need_theta else (0,), dtype=weight.dtype, device=dev)
    ds = torch.empty((N, K) if need_scores else (0,), dtype=scores.dtype, device=dev)
    if N == 0 or K == 0 or not (need_theta or need_scores):
        return dw, ds
    if M == 0:
        return dw.zero_(), ds.zero_()
    launch(
        _masked_linear_wgrad_kernel, _mm_grid(N, K, "BN", "BK"),
        grad, x, w, m, s, dw, ds,
        M, N, K, float(ig_scale),
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        NEED_THETA=bool(need_theta), NEED_SCORES=bool(need_scores), PRECISION=_precision(x),
        DOT_F32=_dot_f32(grad),
    )
    return dw, ds


class MaskedLinearTritonFn(torch.autograd.Function):
    """Autograd for y = x @ (mask*weight)^T + bias with the BiP gradients:
    weight.grad = mask*G, scores.grad = sgn(s)*(weight*G - ig_scale*mask*G^2), G = g^T x."""

    @staticmethod
    def forward(ctx, x, weight, mask, scores, bias, ig_scale):
        out_f, in_f = weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_f)
        y = torch.ops.bip_fast.masked_linear_fwd_triton(x2, weight, mask, bias)
        ctx.save_for_backward(x2, weight, mask, scores if scores is not None else weight)
        ctx.has_scores = scores is not None
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.ig_scale = float(ig_scale)
        ctx.lead = lead
        return y.reshape(*lead, out_f)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, mask, scores = ctx.saved_tensors
        out_f, in_f = weight.shape
        g2 = gy.reshape(-1, out_f)
        if g2.dtype != x2.dtype:
            g2 = g2.to(x2.dtype)
        gx = dw = ds = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.bip_fast.masked_linear_bwd_input_triton(g2, weight, mask)
            gx = gx.reshape(*ctx.lead, in_f)
        need_theta = bool(ctx.needs_input_grad[1])
        need_scores = bool(ctx.has_scores and ctx.needs_input_grad[3])
        if need_theta or need_scores:
            dw, ds = torch.ops.bip_fast.masked_linear_bwd_weight_triton(
                g2, x2, weight, mask, scores, ctx.ig_scale, need_theta, need_scores
            )
            dw = dw if need_theta else None
            ds = ds if need_scores else None
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gb = g2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return gx, dw, None, ds, gb, None


def masked_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    scores: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    ig_scale: float,
) -> torch.Tensor:
    """y = x @ (mask*weight)^T + bias for x of shape (..., in_features), differentiable in
    x, weight, scores and bias (mask is a constant)."""
    register()
    return MaskedLinearTritonFn.apply(x, weight, mask, scores, bias, float(ig_scale))


_ops = {}


def register() -> None:
    if _ops:
        return
    _ops["fwd"] = register_triton_op(
        "bip_fast::masked_linear_fwd_triton", masked_linear_fwd_triton, mutates_args=()
    )
    _ops["bwd_input"] = register_triton_op(
        "bip_fast::masked_linear_bwd_input_triton", masked_linear_bwd_input_triton, mutates_args=()
    )
    _ops["bwd_weight"] = register_triton_op(
        "bip_fast::masked_linear_bwd_weight_triton", masked_linear_bwd_weight_triton, mutates_args=()
    )
