# Fused SGD step (momentum, weight decay) with an optional D1 radix histogram (Triton).
#
# Per element, PyTorch SGD semantics with dampening 0 and no Nesterov (buffers start at zero, so
# the first step's "buffer = d" is momentum * 0 + d):
#   d = g + weight_decay * p ;  b = momentum * b + d ;  p = p - lr * b
# in float32, stored back in the param / buffer dtype. With hist1 (int64[4096], zeroed by the
# caller) the kernel also histograms D1 = key(p_new) >> 19 of the *stored* updated params, i.e.
# exactly the first radix pass of topk_masks on them, so topk_masks_hist can skip that pass.
# With skip (a one-element bool tensor on the device, read by each program: no host sync),
# a true value stores nothing and the histogram counts the unchanged params.
#
# Traffic per element (b = param bytes, c = grad bytes): reads p, g, buf (2b + c), writes p, buf
# (2b); about 5 FLOPs. The histogram adds no traffic: registers, one flush of 4096 bins per
# program (atomics only on non-empty bins). Bandwidth bound.
#
# Limits / trade-offs: one launch per tensor (no device pointer tables, so torch.compile can
# trace the op); fine for CNN-sized parameter lists. Params/grads/buffers sharing a dense layout
# (contiguous, channels_last) are updated in place over their storage; any other layout goes
# through contiguous copies that are copied back (correct, slower). Each program handles
# BLOCK * ITERS elements so that the histogram flush is amortised.

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import launch, register_triton_op

BLOCK = 1024
ITERS = 4
NUM_BINS = 4096


@triton.jit
def _fused_sgd_kernel(
    p_ptr, g_ptr, b_ptr, hist_ptr, skip_ptr, n, lr, momentum, weight_decay,
    HIST: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, NBINS: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    if SKIP:
        upd = tl.load(skip_ptr) == 0
    else:
        upd = True
    if HIST:
        acc = tl.zeros([NBINS], dtype=tl.int32)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        wr = inb & upd
        p0 = tl.load(p_ptr + offs, mask=inb, other=0.0)
        p = p0.to(tl.float32)
        g = tl.load(g_ptr + offs, mask=wr, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=wr, other=0.0).to(tl.float32)
        d = g + weight_decay * p
        b = momentum * b + d
        p = p - lr * b
        p_out = tl.where(upd, p.to(p_ptr.dtype.element_ty), p0)
        tl.store(p_ptr + offs, p_out, mask=wr)
        tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=wr)
        if HIST:
            key = p_out.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            acc += tl.histogram(key >> 19, NBINS, mask=inb)
    if HIST:
        bins = tl.arange(0, NBINS)
        tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc != 0, sem="relaxed")


def _dense_like(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )


def fused_sgd_triton_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    bufs: List[torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    hist1: Optional[torch.Tensor],
    skip: Optional[torch.Tensor] = None,
) -> None:
    want_hist = hist1 is not None
    skip_u8 = None if skip is None else skip.reshape(1).view(torch.uint8)
    per_prog = BLOCK * ITERS
    dummy = None
    for p, g, b in zip(params, grads, bufs):
        n = p.numel()
        if n == 0:
            continue
        same_layout = p.stride() == g.stride() == b.stride() and _dense_like(p)
        if same_layout:
            pw, gw, bw = p, g, b
        else:
            pw, gw, bw = p.contiguous(), g.contiguous(), b.contiguous()
        if (not want_hist or skip_u8 is None) and dummy is None:
            dummy = torch.empty(1, dtype=torch.int64, device=p.device)  # unused hist pointer
        launch(
            _fused_sgd_kernel, (triton.cdiv(n, per_prog),),
            pw, gw, bw, hist1 if want_hist else dummy, dummy if skip_u8 is None else skip_u8, n,
            float(lr), float(momentum), float(weight_decay),
            HIST=want_hist, SKIP=skip_u8 is not None, BLOCK=BLOCK, ITERS=ITERS, NBINS=NUM_BINS,
        )
        if not same_layout:
            p.copy_(pw)
            b.copy_(bw)


_ops = {}


def register() -> None:
    if _ops:
        return
    _ops["fused_sgd_"] = register_triton_op(
        "bip_fast::fused_sgd_triton_", fused_sgd_triton_, mutates_args={"params", "bufs", "hist1"}
    )
