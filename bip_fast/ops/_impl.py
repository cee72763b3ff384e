"""Backend calls of the ops: one dense order for elementwise kernels, and the dispatch of each
resolved backend name (``reference``, ``triton``, ``cpp``/``cuda``) to its kernel.

The public functions in :mod:`bip_fast.ops` validate and resolve a backend once, then call here;
:mod:`.autograd` calls here directly on its hot path.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import reference as _ref


# --------------------------------------------------------------------------------------------
# dense-layout helpers: elementwise kernels want one dense order shared by all operands
# --------------------------------------------------------------------------------------------
def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense_views(*ts: torch.Tensor):
    """Views in which every operand is contiguous, and a function mapping results back.

    channels_last tensors are viewed as contiguous NHWC (elementwise ops do not care about the
    logical order), so nothing is copied and the result keeps the channels_last layout.
    """
    if all(_is_cl(t) for t in ts):
        return [t.permute(0, 2, 3, 1) for t in ts], (lambda r: r.permute(0, 3, 1, 2))
    return [t.contiguous() for t in ts], (lambda r: r)


def _cpp():
    _ext.load()
    return torch.ops.bip_fast


def _triton():
    # Triton is an optional dependency, and importing it costs seconds: only on first use.
    from . import triton as _tr

    return _tr


# --------------------------------------------------------------------------------------------
# masked weight
# --------------------------------------------------------------------------------------------
def _masked_weight_impl(name: str, theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if name == "reference":
        return _ref.masked_weight_ref(theta, mask)
    (t, m), back = _dense_views(theta, mask)
    if name == "triton":
        return back(_triton().masked_weight_triton(t, m))
    return back(_cpp().masked_weight(t, m))


def _masked_weight_backward_impl(name, grad, theta, mask, scores, ig_scale, need_theta, need_scores):
    if name == "reference":
        return _ref.masked_weight_backward_ref(grad, theta, mask, scores, ig_scale, need_theta, need_scores)
    (g, t, m, s), back = _dense_views(grad, theta, mask, scores)
    fn = _triton().masked_weight_backward_triton if name == "triton" else _cpp().masked_weight_backward
    dt, ds = fn(g, t, m, s, ig_scale, bool(need_theta), bool(need_scores))
    return (back(dt) if need_theta else dt), (back(ds) if need_scores else ds)
