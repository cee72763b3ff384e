"""How BiP's and Hydra's scores start (:func:`init_scores`) and, with ``BiP(unit_scores=True)``,
one score per filter or channel instead of one per weight (:class:`UnitScores`).

Unit scores (filter and channel structures): the projection keeps whole filters (channels) ranked
by the L2 norm of their scores, so a per-weight score only matters through its unit's norm, and
the entries of one unit can pull against each other. Sharing one score per unit removes that
freedom: every entry of a unit holds the same value (initialised to the root mean square of the
unit's initial scores, so the unit's L2 norm and hence the first mask are unchanged), and every
score gradient is replaced by the mean over its unit. Momentum and weight decay act entry by entry
on equal entries, so the entries stay equal through every update. The mean, not the sum (the
gradient of one shared parameter): the sum would multiply the score learning rate by the unit's
size (a 3x3 conv filter of 64 input channels: 576), so that ``score_lr`` keeps its meaning.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from ._validate import _check_choice

__all__ = ["SCORE_INITS", "UNIT_STRUCTURES", "UnitScores", "init_scores"]

SCORE_INITS = ("magnitude", "hydra")
UNIT_STRUCTURES = ("filter", "channel")


@torch.no_grad()
def init_scores(modules, how: str) -> None:
    """Set each module's scores from its weights.

    ``"magnitude"``: s = |θ| (the projection then starts from global magnitude pruning).
    ``"hydra"``: Hydra's scaled init, s = sqrt(6 / fan_in) · |θ| / max|θ| per layer, fan_in =
    in_features or in_channels/groups · kh · kw (each layer's largest score equals the bound of
    Kaiming-uniform init, so the score scale does not depend on the weight scale).
    Scores are non-negative either way; the STE's sgn(s) is then +1 until a score crosses 0.
    """
    _check_choice(how, "score_init", SCORE_INITS)
    for m in modules:
        a = m.weight.detach().abs().to(torch.float32)
        if how == "hydra":
            fan_in = m.weight[0].numel()
            top = a.max()
            a = a * (math.sqrt(6.0 / fan_in) / torch.where(top > 0, top, torch.ones_like(top)))
        m.scores.copy_(a)


def _unit_dim(mod: nn.Module, structure: str) -> int:
    """The weight dimension that indexes ``structure``'s units in ``mod`` (filters: its output
    channels, ``out_dim``; channels: the other of the first two)."""
    out = getattr(mod, "out_dim", 0)
    return out if structure == "filter" else 1 - out


class UnitScores:
    """One shared score per filter / channel of ``modules`` (see the module docstring). On
    construction the scores become their unit's root mean square; a gradient hook on each
    ``scores`` replaces the gradient by its unit's mean. ``average()`` applies the same mean to
    gradients changed after the hooks ran (the data-parallel implicit-gradient term);
    ``remove()`` takes the hooks off."""

    def __init__(self, modules: Sequence[nn.Module], structure: str) -> None:
        self.dims: List[List[int]] = []
        self.handles = []
        self.modules = list(modules)
        with torch.no_grad():
            for mod in self.modules:
                s = mod.scores
                keep = _unit_dim(mod, structure)
                dims = [d for d in range(s.dim()) if d != keep]
                self.dims.append(dims)
                rms = s.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
                s.copy_(rms.expand_as(s).to(s.dtype))
                self.handles.append(s.register_hook(lambda g, dims=dims: _unit_mean(g, dims)))

    @torch.no_grad()
    def average(self) -> None:
        for mod, dims in zip(self.modules, self.dims):
            if mod.scores.grad is not None:
                mod.scores.grad.copy_(_unit_mean(mod.scores.grad, dims))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _unit_mean(g: torch.Tensor, dims: List[int]) -> torch.Tensor:
    return g.float().mean(dim=dims, keepdim=True).expand_as(g).to(g.dtype).contiguous()
