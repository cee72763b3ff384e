"""BiP's ``bn_correction``: the score gradient of a pruned filter whose output feeds a BatchNorm,
taken as if the BatchNorm normalised that filter by its own spread (docs/results.md, "Why BiP's
per-layer filter masks fall behind").

A pruned filter outputs an all-zero channel; in train mode the BatchNorm after it divides the
channel's deviation by sqrt(0 + eps) instead of a standard deviation, so the straight-through score
gradient of that filter (θ⊙g, linearised at the zero channel) is larger by about σ/sqrt(eps)
(hundreds at eps 1e-5) than what switching the filter on would change: switched on, its output
would be normalised by about its own σ. The correction multiplies the score gradient of every
filter that keeps no weight by sqrt(eps / (σ² + eps)), σ² the batch variance (per channel, biased,
as BatchNorm computes it) of that filter's output with its weights θ switched on, from one extra
convolution of the pruned filters on the layer's input of the same pass. Kept filters and layers
without a BatchNorm right after them are left alone.
"""

from __future__ import annotations

from typing import Dict, List

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import kept_units
from ..nn import norms_after

__all__ = ["BNCorrection", "attach_bn_correction"]


class BNCorrection:
    """Hooks on ``modules`` (masked conv layers named ``names`` in ``model``): a forward pre-hook
    keeps each layer's input of the latest pass, a gradient hook on its ``scores`` rescales the
    rows of the filters its mask removes. ``remove()`` takes the hooks off."""

    def __init__(self, model: nn.Module, names: List[str], modules: List[nn.Module]) -> None:
        after = norms_after(model)
        self.inputs: Dict[str, torch.Tensor] = {}
        self.handles = []
        self.layers: List[str] = []
        for name, mod in zip(names, modules):
            if name not in after or not isinstance(mod, nn.Conv2d) or getattr(mod, "out_dim", 0) != 0:
                continue
            bn = model.get_submodule(after[name])
            self.layers.append(name)
            self.handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: self._keep(n, args[0])))
            self.handles.append(mod.scores.register_hook(lambda g, m=mod, n=name, b=bn: self._scale(g, m, n, b)))

    def _keep(self, name: str, x: torch.Tensor) -> None:
        """The layer's input, for the backward of this pass; a forward without gradients (evaluation)
        has no backward, so it keeps nothing."""
        if torch.is_grad_enabled():
            self.inputs[name] = x.detach()

    def _scale(self, g: torch.Tensor, mod: nn.Conv2d, name: str, bn: nn.Module) -> torch.Tensor:
        x = self.inputs.pop(name, None)  # this pass's input, released once used
        pruned = ~kept_units(mod.mask)
        if x is None or not bool(pruned.any()):
            return g
        with torch.no_grad():
            w = mod.weight[pruned].to(x.dtype)
            z = F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups) if mod.groups == 1 else \
                F.conv2d(x, mod.weight.to(x.dtype), None, mod.stride, mod.padding, mod.dilation, mod.groups)[:, pruned]
            var = z.float().var(dim=(0, 2, 3), unbiased=False)
            c = torch.sqrt(bn.eps / (var + bn.eps)).to(g.dtype)
            g = g.clone()
            g[pruned] *= c.view(-1, *([1] * (g.dim() - 1)))
        return g

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.inputs = [], {}


def attach_bn_correction(alg):
    """The hooks on ``alg``'s masked conv layers that a BatchNorm alone reads (a warning, and none,
    when torch.fx cannot trace the model)."""
    try:
        hooks = BNCorrection(alg.model, alg.module_names, alg.modules)
    except ValueError as e:
        warnings.warn(f"BiP: bn_correction finds no BatchNorm to correct for: {e}", UserWarning, stacklevel=3)
        return None
    if not hooks.layers:
        warnings.warn("BiP: bn_correction found no conv layer followed by a BatchNorm; nothing is corrected",
                      UserWarning, stacklevel=3)
    return hooks
