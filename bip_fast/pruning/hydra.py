"""Hydra: score-only pruning with frozen weights, then finetuning under the fixed mask (SPEC §5)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .base import Algorithm, SGDGroup, _project_into
from ._validate import Batch, _check_structure, _check_total_steps, check_target
from .bip import _NORM_TYPES, init_scores

__all__ = ["Hydra"]

PHASES = ("prune", "finetune")


class Hydra(Algorithm):
    """Hydra (Sehwag et al. 2020) as the BiP paper's baseline.

    Phase ``"prune"`` (initial): scores start from Hydra's scaled magnitudes,
    s = sqrt(6/fan_in)·|θ|/max|θ| per layer (:func:`bip_fast.pruning.bip.init_scores`), and are
    trained by SGD (``score_lr``, momentum, ``score_weight_decay``) through the straight-through
    top-K (``ig_scale`` = 0, G_s = sgn(s)·θ⊙g); after each score step the mask is re-projected.
    Weights and biases are never updated in this phase (with ``train_bn=True`` the
    normalisation parameters are trained with the scores, as in Hydra's code).
    Default ``structure="layer"``: Hydra prunes every layer to the same ratio; its per-layer score
    scaling makes a global ranking compare rescaled magnitudes (pass ``"global"`` if wanted).

    :meth:`finetune` switches to phase ``"finetune"``: the mask is frozen and all weights, biases
    and norm parameters are trained with SGD (``lr``, momentum, ``weight_decay``); the step
    counter restarts so the cosine schedule (``finetune_steps``, default ``total_steps``) does too.
    ``batch2`` is ignored in both phases.

    ``macs=f`` / ``params=f`` instead of ``sparsity`` (``structure="group"``): a MACs or
    parameter budget, as in :class:`~bip_fast.pruning.bip.BiP`.
    """

    name = "hydra"

    def __init__(
        self,
        model: nn.Module,
        sparsity: Optional[float] = None,
        *,
        macs: Optional[float] = None,
        params: Optional[float] = None,
        structure: str = "layer",
        score_lr: float = 0.1,
        score_weight_decay: float = 5e-4,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        total_steps: Optional[int] = None,
        finetune_steps: Optional[int] = None,
        train_bn: bool = False,
        n: int = 2,
        m: int = 4,
        loss_fn=None,
        compute_loss=None,
        include=None,
        exclude=None,
    ) -> None:
        self.sparsity_target, self.budget = check_target(sparsity, macs, params, structure)
        _check_structure(structure, self.sparsity_target or 0.0, n, m)
        if not isinstance(train_bn, bool):
            raise TypeError(f"train_bn: expected a bool, got {type(train_bn).__name__}")
        self.structure, self.n, self.m = structure, n, m
        self.finetune_steps = _check_total_steps(finetune_steps)
        super().__init__(model, total_steps=total_steps, loss_fn=loss_fn, compute_loss=compute_loss,
                         include=include, exclude=exclude, structure=structure)
        if self.finetune_steps is None:
            self.finetune_steps = self.total_steps
        self.phase = "prune"
        init_scores(self.modules, "hydra")
        for mod in self.modules:
            mod.ig_scale = 0.0
        score_params = list(self._scores())
        if train_bn:
            score_params += [p for mod in self.model.modules() if isinstance(mod, _NORM_TYPES)
                             for p in mod.parameters(recurse=False) if p.requires_grad]
        self.param_groups = {
            "scores": SGDGroup("scores", score_params, score_lr, momentum, score_weight_decay),
            "weights": SGDGroup("weights", self._lower_params(), lr, momentum, weight_decay),
        }
        self._project()

    def _project(self) -> None:
        _project_into(self, self._scores(), 1.0 - (self.sparsity_target or 0.0), self.structure, self.n, self.m,
                      budget=self.budget)

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """Prune phase: score step + projection. Finetune phase: weight step under the fixed mask."""
        if self.phase == "finetune":
            return self._sgd_step("weights", batch)
        batch = self._check_batch(batch, "batch")
        out = self._forward_backward(batch)
        g = self.param_groups["scores"]
        g.step(g.lr * self.lr_factor(), skip=self._skip)
        self._project()
        self._zero_grad()
        self.step_count += 1
        self.global_step += 1
        return out

    def finetune(self, total_steps: Optional[int] = None) -> None:
        """Freeze the mask and train the weights from now on (cosine over ``total_steps`` if given,
        else ``finetune_steps``)."""
        if self.phase == "finetune":
            raise RuntimeError("finetune: already in the finetune phase")
        self.phase = "finetune"
        self.total_steps = _check_total_steps(total_steps) if total_steps is not None else self.finetune_steps
        self.step_count = 0

    def _extra_state(self) -> Dict[str, object]:
        return {"phase": self.phase, "finetune_steps": self.finetune_steps, "structure": self.structure,
                "sparsity": self.sparsity_target, "budget": None if self.budget is None else str(self.budget)}

    def _load_extra_state(self, sd: Dict[str, object]) -> None:
        if sd.get("phase") not in PHASES:
            raise ValueError(f"state_dict: phase must be one of {PHASES}, got {sd.get('phase')!r}")
        self.phase = sd["phase"]
        self.finetune_steps = sd.get("finetune_steps")
