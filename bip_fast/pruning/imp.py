"""IMP: iterative magnitude pruning with weight rewinding (lottery tickets, SPEC §5)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import ops
from ..masks import keep_count
from ..masks.budget import Budget
from .base import Algorithm, SGDGroup, _project_into
from ._validate import Batch, _check_choice, _check_filter_norm, _check_number, check_sparsity, check_target

STRUCTURES = ("global", "filter", "group")
# mask buffers of the masked layers: what a round sets, and a rewind leaves alone
_MASK_KEYS = ("mask", "scores", "bias_mask", "channel_mask")

__all__ = ["IMP"]


class IMP(Algorithm):
    """Iterative magnitude pruning with rewinding.

    Round 0 is dense training (all masks True). The *rewind state* is the model's state (weights,
    biases, norm parameters and statistics; not masks or scores) when ``rewind_step`` steps of
    round 0 have been taken (``rewind_step=0``: the model as given). :meth:`next_round` then:

    1. prunes ``rate`` (20%) of the remaining weights: the new mask keeps the
       ``round((1 - rate) · R)`` largest |θ| among the R currently unmasked weights, globally over
       all masked layers (ties: earlier layer, then lower flat index); pruned weights stay pruned.
       ``structure="filter"`` (IMP-F) prunes whole filters instead: each layer keeps
       ``max(1, round((1 - rate) · R_l))`` of its R_l remaining filters, those whose masked weights
       have the largest norm (``filter_norm``: ``"l2"`` or ``"l1"``; ties to the lower index);
       ``structure="group"`` does the same per coupled channel group of
       :func:`bip_fast.attach_groups` (a channel's score as in the group structure: the
       root-mean-square, or with ``"l1"`` the mean magnitude, of its members' masked weights);
    2. rewinds the whole model state except masks and scores to the rewind state;
    3. resets the optimiser (zero momentum) and the schedule: each round retrains for the full
       ``total_steps`` cosine schedule from step 0.

    ``step(batch)`` is one SGD step (momentum, weight decay) of all parameters under the current
    masks; ``batch2`` is ignored. Scores are not trained (their gradient is switched off once at
    construction). ``IMP.rounds_for(density)`` gives the rounds needed to reach a density.

    Landing on a target: with ``sparsity`` (None: the fixed series, every round prunes ``rate``)
    the run takes :attr:`target_rounds` = ``rounds_for(1 - sparsity, rate)`` rounds; every round
    but the last prunes ``rate`` of the remaining weights (never past the target), and the last
    one prunes what is left to reach it, so ``structure="global"`` ends with exactly
    K = round((1 - sparsity) · N) weights, as BiP's top-K does (``"filter"`` / ``"group"``: its
    keep fraction is the target density over the current one, as near as whole filters allow).
    A further round raises. ``IMP.schedule(sparsity, rate)`` lists the sparsity after each round.

    Pruning a converged model with rewinding to early weights of the same dense run (SPEC §5,
    when the dense run happened elsewhere): construct IMP on the converged model, then
    :meth:`set_rewind_state` with the early state dict; round 1 prunes by the converged
    magnitudes and rewinds to the early weights.

    A budget instead of ``sparsity`` (``structure="group"``): ``macs=f`` or ``params=f`` keeps at
    most the fraction ``f`` of the dense model's MACs or parameters (:mod:`bip_fast.masks.budget`:
    the channels of all groups ranked together by weight mass per unit of cost). Round r keeps at
    most ``max(f, (1 - rate)^r)`` of the dense cost, the last round (``rounds_for(f, rate)``) ``f``.
    """

    name = "imp"

    def __init__(
        self,
        model: nn.Module,
        *,
        rate: float = 0.2,
        sparsity: Optional[float] = None,
        macs: Optional[float] = None,
        params: Optional[float] = None,
        rewind_step: int = 0,
        structure: str = "global",
        filter_norm: str = "l2",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        total_steps: Optional[int] = None,
        loss_fn=None,
        compute_loss=None,
        include=None,
        exclude=None,
    ) -> None:
        self.rate = _check_number(rate, "rate", low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
        self.sparsity_target, self.budget = check_target(sparsity, macs, params, structure, required=False)
        self.target_rounds = (self.rounds_for(self.budget.fraction, self.rate) if self.budget is not None else
                              None if self.sparsity_target is None else self.rounds_for(1.0 - self.sparsity_target,
                                                                                         self.rate))
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int):
            raise TypeError(f"rewind_step: expected an int, got {type(rewind_step).__name__}")
        if rewind_step < 0:
            raise ValueError(f"rewind_step: expected a non-negative int, got {rewind_step}")
        self.rewind_step = rewind_step
        self.structure = _check_choice(structure, "structure", STRUCTURES)
        self.filter_norm = _check_filter_norm(filter_norm, structure)
        super().__init__(model, total_steps=total_steps, loss_fn=loss_fn, compute_loss=compute_loss,
                         include=include, exclude=exclude, structure=structure)
        self._freeze_scores()
        self.round = 0
        self.param_groups = {"weights": SGDGroup("weights", self._lower_params(), lr, momentum, weight_decay)}
        self._rewind: Optional[Dict[str, torch.Tensor]] = None
        self._maybe_record_rewind()

    @staticmethod
    def rounds_for(density: float, rate: float = 0.2) -> int:
        """Rounds to reach ``density``: ceil(log d / log(1 − rate)) (0.64 -> 2, 0.41 -> 4)."""
        d = _check_number(density, "density", low=0.0, low_inclusive=False, high=1.0)
        r = _check_number(rate, "rate", low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
        # A relative tolerance keeps exact powers (0.8**2 = 0.64000...01) from costing a round.
        return max(0, math.ceil(math.log(d) / math.log(1.0 - r) - 1e-9))

    @staticmethod
    def schedule(sparsity: Optional[float] = None, rate: float = 0.2, rounds: Optional[int] = None) -> List[float]:
        """Sparsity after each round: landing on ``sparsity`` (``rounds_for(1 - sparsity, rate)``
        rounds, the last one pruning less), or the fixed series of ``rounds`` rounds of ``rate``
        (1 - (1 - rate)^r). Ideal values: a global round keeps a whole number of weights."""
        r = _check_number(rate, "rate", low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
        if (sparsity is None) == (rounds is None):
            raise ValueError(f"schedule: expected a target sparsity or a number of rounds, got sparsity={sparsity!r}, "
                             f"rounds={rounds!r}")
        if rounds is not None:
            if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
                raise ValueError(f"rounds: expected a non-negative int, got {rounds!r}")
            return [1.0 - (1.0 - r) ** i for i in range(1, rounds + 1)]
        s = check_sparsity(sparsity)
        n = IMP.rounds_for(1.0 - s, r)
        return [min(s, 1.0 - (1.0 - r) ** i) for i in range(1, n)] + ([s] if n else [])

    def _state_keys(self):
        return [k for k in self.model.state_dict() if k.rsplit(".", 1)[-1] not in _MASK_KEYS]

    @torch.no_grad()
    def _maybe_record_rewind(self) -> None:
        if self._rewind is None and self.round == 0 and self.step_count == self.rewind_step:
            sd = self.model.state_dict()
            self._rewind = {k: sd[k].detach().clone() for k in self._state_keys()}

    def _checked_rewind(self, state: Dict[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        """Copies of the entries of ``state`` that a rewind restores, on the model's devices."""
        mine = self.model.state_dict()
        missing = sorted(set(self._state_keys()) - set(state))
        if missing:
            raise ValueError(f"{what}: rewind state lacks {missing}")
        out = {}
        for k in self._state_keys():
            v = state[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(mine[k].shape):
                raise ValueError(f"{what}: rewind state {k!r}: expected shape {tuple(mine[k].shape)}, got "
                                 f"{tuple(getattr(v, 'shape', ()))}")
            out[k] = v.detach().to(device=mine[k].device, dtype=mine[k].dtype).clone()
        return out

    @torch.no_grad()
    def set_rewind_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Rewind every round to ``state`` (a model state dict: weights, biases, norm parameters and
        statistics; masks and scores are ignored) instead of the model at step ``rewind_step``.
        Only before the first round."""
        if self.round != 0:
            raise RuntimeError(f"set_rewind_state: round {self.round} has begun; set the rewind state before "
                               f"the first next_round()")
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a state dict, got {type(state).__name__}")
        self._rewind = self._checked_rewind(state, "state")

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """One SGD step on ``batch`` under the current masks (``batch2`` is ignored)."""
        self._maybe_record_rewind()
        return self._sgd_step("weights", batch)

    @torch.no_grad()
    def next_round(self, rate: Optional[float] = None) -> None:
        """Prune ``rate`` (default: the constructor's) of the remaining weights (``structure``:
        filters, group channels) by magnitude, rewind, reset the schedule. With a target
        ``sparsity`` no round prunes past it and round :attr:`target_rounds` lands on it."""
        rate = self.rate if rate is None else _check_number(rate, "rate", low=0.0, low_inclusive=False, high=1.0,
                                                             high_inclusive=False)
        self._check_nonfinite()
        self._maybe_record_rewind()
        if self._rewind is None:
            raise RuntimeError(
                f"next_round: the rewind point (step {self.rewind_step} of round 0) has not been reached; "
                f"{self.step_count} steps taken"
            )
        last = False
        if self.target_rounds is not None:
            if self.round >= self.target_rounds:
                what = (f"sparsity {self.sparsity_target:g}" if self.budget is None else f"budget {self.budget}")
                raise RuntimeError(f"next_round: round {self.target_rounds} reached the target {what}; there is no "
                                   f"round {self.round + 1}")
            last = self.round + 1 == self.target_rounds
        if self.structure == "global":
            self._prune_global(rate, last)
        elif self.budget is not None:  # this round's share of the dense cost, never below the target
            f = self.budget.fraction
            budget = Budget(self.budget.kind, f if last else max(f, (1.0 - rate) ** (self.round + 1)))
            old = [m.mask.clone() for m in self.modules]
            _project_into(self, [m.weight.detach() * m.mask for m in self.modules], 1.0, self.structure,
                          2, 4, filter_norm=self.filter_norm, within=old, budget=budget)
        else:
            old = [m.mask.clone() for m in self.modules]
            keep = 1.0 - rate
            if self.sparsity_target is not None:  # the fraction of what is left that reaches the target
                need = min(1.0, (1.0 - self.sparsity_target) / max(1.0 - self.sparsity(), 1e-12))
                keep = need if last else max(keep, need)
            _project_into(self, [m.weight.detach() * m.mask for m in self.modules], keep, self.structure,
                          2, 4, filter_norm=self.filter_norm, within=old)
        sd = self.model.state_dict()
        for k, v in self._rewind.items():
            sd[k].copy_(v)
        for g in self.param_groups.values():
            g.reset()
        self.step_count = 0
        self.round += 1

    def _prune_global(self, rate: float, last: bool = False) -> None:
        old = [m.mask for m in self.modules]
        remaining = int(sum(int(mk.sum()) for mk in old))
        keep = keep_count(remaining, 1.0 - rate)
        if self.sparsity_target is not None:  # K of the target: exactly in the last round, never fewer before
            target = keep_count(sum(mk.numel() for mk in old), 1.0 - self.sparsity_target)
            keep = min(remaining, target if last else max(keep, target))
        cand = [(i, m.weight.detach().abs()[m.mask]) for i, m in enumerate(self.modules)]
        cand = [(i, c) for i, c in cand if c.numel() > 0]
        new = [torch.zeros_like(mk) for mk in old]
        if cand and keep > 0:
            sel = ops.topk_masks([c for _, c in cand], keep)
            for (i, _), s in zip(cand, sel):
                new[i][old[i]] = s
        self._set_masks(new)

    def _extra_state(self) -> Dict[str, object]:
        rew = None if self._rewind is None else {k: v.clone() for k, v in self._rewind.items()}
        return {"round": self.round, "rewind": rew, "rewind_step": self.rewind_step, "rate": self.rate,
                "structure": self.structure, "filter_norm": self.filter_norm, "sparsity_target": self.sparsity_target,
                "budget": None if self.budget is None else str(self.budget)}

    def _load_extra_state(self, sd: Dict[str, object]) -> None:
        self.round = int(sd["round"])
        self.rewind_step = int(sd["rewind_step"])
        self.rate = float(sd["rate"])
        if "sparsity_target" in sd and sd["sparsity_target"] != self.sparsity_target:
            raise ValueError(f"state_dict: holds an IMP run with sparsity={sd['sparsity_target']!r} (None: the fixed "
                             f"series), this one has {self.sparsity_target!r}")
        if sd.get("budget") != (None if self.budget is None else str(self.budget)):
            raise ValueError(f"state_dict: holds an IMP run with budget {sd.get('budget')!r}, this one has "
                             f"{None if self.budget is None else str(self.budget)!r}")
        if self.budget is not None:
            self.target_rounds = self.rounds_for(self.budget.fraction, self.rate)
        elif self.sparsity_target is not None:
            self.target_rounds = self.rounds_for(1.0 - self.sparsity_target, self.rate)
        for key in ("structure", "filter_norm"):
            saved = sd.get(key, "global" if key == "structure" else "l2")
            if saved != getattr(self, key):
                raise ValueError(f"state_dict: holds an IMP run with {key}={saved!r}, this one has {getattr(self, key)!r}")
        rew = sd["rewind"]
        self._rewind = None if rew is None else self._checked_rewind(rew, "state_dict")
