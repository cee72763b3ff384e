"""Functional ops: validated public entry points with backend dispatch.

Each op has a pure-PyTorch reference (:mod:`bip_fast.ops.reference`), a C++ CPU kernel, a CUDA C++
kernel and a Triton kernel; :func:`bip_fast.ops._dispatch.resolve_backend` picks one per call.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from . import reference as _ref
from ._impl import _cpp, _dense_views, _masked_weight_backward_impl, _masked_weight_impl, _triton
from .autograd import MaskedWeightFn
from ._dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    resolve_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "use_backend",
    "keep_count",
    "topk_masks",
    "radix_histogram",
    "masked_weight",
    "masked_weight_backward",
    "masked_linear",
    "fused_sgd_",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_ELEMENTS = 2**31 - 1


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_tensor(t, name: str, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")


def _check_tensor_list(ts, name: str) -> List[torch.Tensor]:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(ts).__name__}")
    if len(ts) == 0:
        raise ValueError(f"{name}: expected at least one tensor, got an empty list")
    ts = list(ts)
    for i, t in enumerate(ts):
        _check_tensor(t, f"{name}[{i}]")
        if t.device != ts[0].device:
            raise ValueError(f"{name}[{i}]: expected device {ts[0].device} like {name}[0], got {t.device}")
    return ts


def _check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} like {ref_name}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} like {ref_name}, got {t.device}")


def _check_mask(mask, ref: torch.Tensor, name: str = "mask", ref_name: str = "weight") -> None:
    _check_tensor(mask, name, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")
    _check_like(mask, ref, name, ref_name)


def keep_count(n: int, density: float) -> int:
    """K = round(density · n), rounding halves up (SPEC §1)."""
    if not isinstance(density, (int, float)) or isinstance(density, bool):
        raise TypeError(f"density: expected a float, got {type(density).__name__}")
    if not math.isfinite(density) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a value in [0, 1], got {density}")
    return min(n, int(math.floor(density * n + 0.5)))


# --------------------------------------------------------------------------------------------
# top-K projection
# --------------------------------------------------------------------------------------------
def radix_histogram(
    scores: Sequence[torch.Tensor],
    shift: int = _ref.D1_SHIFT,
    bits: int = 12,
    prefix: int = 0,
    prefix_shift: int = 31,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Histogram (int64[4096]) of one radix digit of |s| over all ``scores`` (docs/design.md)."""
    scores = _check_tensor_list(scores, "scores")
    if not (0 <= shift < 31 and 1 <= bits <= 12 and shift + bits <= 31):
        raise ValueError(f"shift/bits: expected 0 <= shift, 1 <= bits <= 12, shift + bits <= 31, got {shift}/{bits}")
    name = resolve_backend("radix_histogram", scores[0].device, backend, dtype=_common_dtype(scores))
    if name == "reference":
        return _ref.radix_histogram_ref(scores, shift, bits, prefix, prefix_shift)
    if name == "triton":
        return _triton().radix_histogram_triton(scores, shift, bits, prefix, prefix_shift)
    return _cpp().radix_histogram(scores, shift, bits, prefix, prefix_shift)


def _common_dtype(ts: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else ts[0].dtype


def topk_masks(
    scores: Sequence[torch.Tensor],
    keep: int,
    *,
    hist1: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> List[torch.Tensor]:
    """Bool masks with exactly ``keep`` True entries over all ``scores``: the largest |s|.

    Ties at the threshold go to the entry that comes first in (tensor order, row-major flat
    index) — SPEC §2. No concatenation and no sort: a multi-tensor radix select over the float
    bits. ``hist1`` (the first-digit histogram, e.g. from :func:`fused_sgd_`) saves one pass.
    NaN or inf scores raise ValueError (detected from the first-digit histogram at no extra pass).
    """
    scores = _check_tensor_list(scores, "scores")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep: expected an int, got {type(keep).__name__}")
    total = sum(s.numel() for s in scores)
    if total > MAX_ELEMENTS:
        raise ValueError(f"scores: at most {MAX_ELEMENTS} elements in total, got {total}")
    if not 0 <= keep <= total:
        raise ValueError(f"keep: expected a value in [0, {total}] (number of scores), got {keep}")
    dtype = _common_dtype(scores)
    if dtype == torch.float64:
        raise TypeError("scores: float64 scores are not supported (use float32, float16 or bfloat16)")
    name = resolve_backend("topk_masks", scores[0].device, backend, dtype=dtype)
    if hist1 is None:
        hist1 = radix_histogram(scores, backend=name)
    else:
        _check_tensor(hist1, "hist1", floating=False)
        if hist1.dtype != torch.int64 or hist1.shape != (4096,) or hist1.device != scores[0].device:
            raise ValueError(
                f"hist1: expected an int64 tensor of shape (4096,) on {scores[0].device}, "
                f"got {hist1.dtype} {tuple(hist1.shape)} on {hist1.device}"
            )
    # One small device->host read validates every score: inf and NaN land in the top D1 bins.
    if int(hist1[_ref.NONFINITE_D1 :].sum()) != 0:
        for i, s in enumerate(scores):
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"scores[{i}]: contains NaN or inf")
        raise ValueError("hist1: counts non-finite scores, but the scores are finite (stale histogram?)")
    if int(hist1.sum()) != total:
        raise ValueError(f"hist1: counts {int(hist1.sum())} scores, expected {total} (stale histogram?)")
    if keep == 0 or keep == total:
        return [torch.full(s.shape, keep == total, dtype=torch.bool, device=s.device) for s in scores]
    if name == "reference":
        return _ref.topk_masks_ref(scores, keep)
    if name == "triton":
        return _triton().topk_masks_hist_triton(scores, keep, hist1)
    return _cpp().topk_masks_hist(scores, keep, hist1)


# --------------------------------------------------------------------------------------------
# masked weight with straight-through backward
# --------------------------------------------------------------------------------------------
def _check_weight_args(theta, mask, scores=None):
    _check_tensor(theta, "weight")
    _check_mask(mask, theta)
    if scores is not None:
        _check_tensor(scores, "scores")
        _check_like(scores, theta, "scores", "weight")


def masked_weight_forward(theta: torch.Tensor, mask: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """z = m ⊙ θ without autograd (validated)."""
    _check_weight_args(theta, mask)
    return _masked_weight_impl(resolve_backend("masked_weight", theta.device, backend, dtype=theta.dtype), theta, mask)


def masked_weight_backward(
    grad: torch.Tensor,
    theta: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    ig_scale: float = 0.0,
    need_theta: bool = True,
    need_scores: bool = True,
    *,
    backend: Optional[str] = None,
):
    """(∂ℓ/∂θ, G_s) from g = ∂ℓ/∂z in one pass (SPEC §3); unneeded outputs are empty tensors."""
    _check_weight_args(theta, mask, scores)
    _check_tensor(grad, "grad")
    _check_like(grad, theta, "grad", "weight")
    _check_ig_scale(ig_scale)
    dtype = _common_dtype([grad, theta, scores])
    name = resolve_backend("masked_weight_backward", theta.device, backend, dtype=dtype)
    return _masked_weight_backward_impl(name, grad, theta, mask, scores, float(ig_scale), need_theta, need_scores)


def _check_ig_scale(ig_scale) -> None:
    if isinstance(ig_scale, bool) or not isinstance(ig_scale, (int, float)) or not math.isfinite(ig_scale):
        raise ValueError(f"ig_scale: expected a finite float, got {ig_scale!r}")


def masked_weight(
    weight: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    ig_scale: float = 0.0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Differentiable z = m ⊙ θ; backward gives ∂ℓ/∂θ = m ⊙ g and ∂ℓ/∂s = G_s (SPEC §3)."""
    _check_weight_args(weight, mask, scores)
    _check_ig_scale(ig_scale)
    dtype = _common_dtype([weight, scores])
    name = resolve_backend("masked_weight", weight.device, backend, dtype=dtype)
    return MaskedWeightFn.apply(weight, scores, mask, float(ig_scale), name)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ig_scale: float = 0.0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = x (m ⊙ θ)ᵀ + b. Triton: the mask is applied to weight tiles as they load and the
    weight-gradient epilogue writes ∂ℓ/∂θ and G_s; other backends: fused masked weight + GEMM."""
    _check_tensor(x, "input")
    _check_weight_args(weight, mask, scores)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input: expected last dimension {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"input: expected device {weight.device} like weight, got {x.device}")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    name = resolve_backend("masked_linear", weight.device, backend, dtype=_common_dtype([x, weight]))
    autocast = torch.is_autocast_enabled(x.device.type) if hasattr(torch, "is_autocast_enabled") else False
    if name == "triton" and not autocast and x.dtype == weight.dtype:
        return _triton().masked_linear_triton(x, weight, mask, scores, bias, float(ig_scale))
    z = masked_weight(weight, scores, mask, ig_scale, backend=name)
    return torch.nn.functional.linear(x, z, bias)


# --------------------------------------------------------------------------------------------
# fused multi-tensor SGD update
# --------------------------------------------------------------------------------------------
def fused_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    *,
    hist1: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> None:
    """In place over all tensors, one launch: d = g + wd·p; b = μ·b + d; p −= lr·b.

    With ``hist1`` (int64[4096], zeroed by the caller) the first radix digit histogram of the
    updated parameters is accumulated, so the next :func:`topk_masks` skips its first pass.
    ``skip`` (a one-element bool tensor on the parameters' device, e.g. a found-NaN/inf flag)
    is read by the kernel itself: when true nothing changes (``hist1`` still counts the
    unchanged parameters), and no host synchronisation happens either way.
    """
    params = _check_tensor_list(params, "params")
    grads = _check_tensor_list(grads, "grads")
    bufs = _check_tensor_list(momentum_buffers, "momentum_buffers")
    if not len(params) == len(grads) == len(bufs):
        raise ValueError(
            f"params/grads/momentum_buffers: expected equal lengths, got {len(params)}/{len(grads)}/{len(bufs)}"
        )
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        _check_like(g, p, f"grads[{i}]", f"params[{i}]")
        _check_like(b, p, f"momentum_buffers[{i}]", f"params[{i}]")
    for nm, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{nm}: expected a finite float, got {v!r}")
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(f"lr/momentum/weight_decay: expected non-negative values, got {lr}/{momentum}/{weight_decay}")
    if hist1 is not None:
        _check_tensor(hist1, "hist1", floating=False)
        if hist1.dtype != torch.int64 or hist1.shape != (4096,) or hist1.device != params[0].device:
            raise ValueError(f"hist1: expected an int64 tensor of shape (4096,) on {params[0].device}")
    if skip is not None:
        _check_tensor(skip, "skip", floating=False)
        if skip.dtype != torch.bool or skip.numel() != 1 or skip.device != params[0].device:
            raise ValueError(f"skip: expected a one-element bool tensor on {params[0].device}, got "
                             f"{skip.dtype} of shape {tuple(skip.shape)} on {skip.device}")
    name = resolve_backend("fused_sgd_", params[0].device, backend, dtype=_common_dtype(params + grads + bufs))
    if name == "reference":
        _ref.fused_sgd_ref_(params, grads, bufs, float(lr), float(momentum), float(weight_decay), hist1, skip)
        return
    # Kernels update dense storage in place; other layouts go through a dense temporary.
    work = [_dense_views(p, g, b)[0] for p, g, b in zip(params, grads, bufs)]
    ps, gs, bs = (list(t) for t in zip(*work))
    if name == "triton":
        _triton().fused_sgd_triton_(ps, gs, bs, float(lr), float(momentum), float(weight_decay), hist1, skip)
    else:
        _cpp().fused_sgd_(ps, gs, bs, float(lr), float(momentum), float(weight_decay), hist1, skip)
    with torch.no_grad():
        for dst, tmp in zip(params + bufs, ps + bs):
            if tmp.data_ptr() != dst.data_ptr():
                dst.copy_(tmp)
