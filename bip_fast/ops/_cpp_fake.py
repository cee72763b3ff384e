"""Fake (meta) kernels for the C++ ops of csrc/ops.cpp, so torch.compile can trace them.

They only allocate outputs with the metadata the real kernels produce: contiguous tensors with
the input's shape. Imported by bip_fast._ext.load() once bip_fast._C (the schemas) is loaded.
"""
from __future__ import annotations

import torch

_RADIX_BINS = 4096


def _contig_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype if dtype is None else dtype, device=t.device)


@torch.library.register_fake("bip_fast::radix_histogram")
def _radix_histogram_fake(scores, shift, bits, prefix, prefix_shift):
    device = scores[0].device if len(scores) else torch.device("cpu")
    return torch.empty(_RADIX_BINS, dtype=torch.int64, device=device)


@torch.library.register_fake("bip_fast::topk_masks")
def _topk_masks_fake(scores, keep):
    return [_contig_like(s, torch.bool) for s in scores]


@torch.library.register_fake("bip_fast::topk_masks_hist")
def _topk_masks_hist_fake(scores, keep, hist1):
    return [_contig_like(s, torch.bool) for s in scores]


@torch.library.register_fake("bip_fast::masked_weight")
def _masked_weight_fake(theta, mask):
    return _contig_like(theta)


@torch.library.register_fake("bip_fast::masked_weight_backward")
def _masked_weight_backward_fake(grad, theta, mask, scores, ig_scale, need_theta, need_scores):
    dtheta = _contig_like(theta) if need_theta else theta.new_empty((0,))
    gscores = _contig_like(scores) if need_scores else scores.new_empty((0,))
    return dtheta, gscores


@torch.library.register_fake("bip_fast::fused_sgd_")
def _fused_sgd_fake(params, grads, momentum_buffers, lr, momentum, weight_decay, hist1, skip=None):
    return None
