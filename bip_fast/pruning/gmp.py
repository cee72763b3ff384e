"""GMP: gradual magnitude pruning on the cubic schedule, then finetuning at the final sparsity."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ..masks import keep_count
from ._validate import Batch, _check_number, check_sparsity
from .saliency import MaskedSGD, keep_largest

__all__ = ["GMP"]


def _check_step_count(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return value


class GMP(MaskedSGD):
    """Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy
    of pruning for model compression", 2017), in one run from the given (pretrained) model.

    Sparsity follows the cubic schedule
    s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³ for t0 ≤ t ≤ t0 + n·Δt, with
    s_i = ``initial_sparsity``, s_f = ``sparsity``, t0 = ``start_step``, n·Δt = ``ramp_steps``
    and Δt = ``prune_every``. ``step(batch)`` first updates the mask when t (the steps taken so
    far) is t0 + j·Δt or the ramp's end t0 + n·Δt: the mask keeps exactly K_t = round((1 − s_t)·N)
    weights, the largest |θ| among those still kept, over all layers (``structure="global"``) or
    K_t per layer (``"layer"``); pruned weights stay pruned, so the mask only shrinks. Then one SGD
    step (``lr``, momentum, weight decay, cosine over ``total_steps``) of every parameter under the
    mask. After the ramp the run finetunes at the final sparsity until ``total_steps``.
    ``batch2`` is ignored; scores are not trained. Other keyword arguments (``structure``,
    ``lr``, ``momentum``, ``weight_decay``, ``total_steps``, ``loss_fn``, ``include``,
    ``exclude``) are those of :class:`~bip_fast.pruning.saliency.MaskedSGD`.

    Published settings: s_i = 0, cubic schedule, Δt between 100 and 1000 steps (default 100).
    Our choices: ``ramp_steps`` defaults to half of ``total_steps`` (prune over the first half,
    finetune the second); ``lr=0.1``, momentum 0.9, weight decay 5e-4 are the engine's CIFAR
    training defaults. ``prepare(batches)`` exists for a uniform baseline interface and does
    nothing: GMP needs no data beyond its training batches.
    """

    name = "gmp"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        ramp_steps: Optional[int] = None,
        prune_every: int = 100,
        **kwargs,
    ) -> None:
        final = check_sparsity(sparsity)
        self.initial_sparsity = _check_number(initial_sparsity, "initial_sparsity", low=0.0, high=final)
        self.start_step = _check_step_count(start_step, "start_step", 0)
        self.prune_every = _check_step_count(prune_every, "prune_every", 1)
        super().__init__(model, sparsity, **kwargs)
        if ramp_steps is None:
            if self.total_steps is None or self.total_steps < 2:
                raise ValueError("ramp_steps: needed unless total_steps >= 2 (the default is total_steps // 2)")
            ramp_steps = self.total_steps // 2
        self.ramp_steps = _check_step_count(ramp_steps, "ramp_steps", 1)
        end = self.start_step + self.ramp_steps
        if self.total_steps is not None and end >= self.total_steps:
            raise ValueError(f"ramp_steps: start_step + ramp_steps = {end} must be < total_steps "
                             f"({self.total_steps}) so the final sparsity is reached")

    def sparsity_at(self, t: int) -> float:
        """s_t of the cubic schedule (s_i before t0, s_f after the ramp)."""
        frac = min(1.0, max(0.0, (t - self.start_step) / self.ramp_steps))
        return self.sparsity_target + (self.initial_sparsity - self.sparsity_target) * (1.0 - frac) ** 3

    def is_update_step(self, t: int) -> bool:
        """Whether the mask is updated at the start of step ``t`` (0-based)."""
        rel = t - self.start_step
        return 0 <= rel <= self.ramp_steps and (rel % self.prune_every == 0 or rel == self.ramp_steps)

    @torch.no_grad()
    def _prune_to(self, sparsity: float) -> None:
        density = 1.0 - sparsity
        groups: List[List[int]] = ([list(range(len(self.modules)))] if self.structure == "global"
                                   else [[i] for i in range(len(self.modules))])
        new = list(self.masks())
        changed = False
        for idx in groups:
            mods = [self.modules[i] for i in idx]
            keep = keep_count(sum(m.mask.numel() for m in mods), density)
            if keep >= int(sum(m.mask.sum() for m in mods)):
                continue  # the mask only shrinks
            sel = keep_largest([m.weight.detach().abs() for m in mods], [m.mask for m in mods], keep)
            for i, s in zip(idx, sel):
                new[i] = s
            changed = True
        if changed:
            self._set_masks(new)

    def prepare(self, batches=None) -> None:
        """No-op (uniform baseline interface): GMP prunes inside :meth:`step`."""

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """Mask update on the schedule, then one SGD step on ``batch`` (``batch2`` is ignored)."""
        if self.is_update_step(self.step_count):
            self._check_nonfinite()  # no cut from weights a skipped step left behind
            self._prune_to(self.sparsity_at(self.step_count))
        return self._sgd_step("weights", batch)

    def _extra_state(self) -> Dict[str, object]:
        return {"sparsity": self.sparsity_target, "initial_sparsity": self.initial_sparsity,
                "start_step": self.start_step, "ramp_steps": self.ramp_steps, "prune_every": self.prune_every,
                "structure": self.structure}

    def _load_extra_state(self, sd: Dict[str, object]) -> None:
        for k in ("start_step", "ramp_steps", "prune_every"):
            if sd.get(k) != getattr(self, k):
                raise ValueError(f"state_dict: holds {k}={sd.get(k)!r}, this GMP has {getattr(self, k)!r}")
