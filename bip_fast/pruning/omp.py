"""OMP: one-shot magnitude pruning of a pretrained model, then retraining (SPEC §5)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .base import Algorithm, SGDGroup, _project_into
from ._validate import Batch, _check_filter_norm, _check_structure, check_target

__all__ = ["OMP"]


class OMP(Algorithm):
    """One-shot magnitude pruning.

    At construction the mask becomes the projection of |θ| of the given (pretrained) weights
    (``structure="global"``: the K = round(d·N) largest magnitudes over all masked layers; ties to
    the earlier layer, then the lower flat index). ``step(batch)`` then retrains every parameter
    with SGD (momentum, weight decay) under that fixed mask; ``batch2`` is ignored. Scores are
    not trained (their gradient is switched off once at construction).

    Filter pruning (OMP-F): ``structure="filter"`` keeps the round(d·F) filters of each layer with
    the largest norm of their weights (``"group"``: whole channels of each coupled group, see
    :func:`bip_fast.attach_groups`). ``filter_norm`` names the norm: ``"l2"`` (default, SPEC §2)
    or ``"l1"``, which with the retraining that follows is the L1-norm filter pruning of Li et al.
    (ICLR 2017): prune the filters whose weights have the smallest sum of absolute values, retrain.

    Instead of ``sparsity``, ``macs=f`` or ``params=f`` (``structure="group"`` only) keeps at most
    the fraction ``f`` of the dense model's MACs or parameters, the channels of all groups ranked
    together by weight mass per unit of cost (:mod:`bip_fast.masks.budget`).
    """

    name = "omp"

    def __init__(
        self,
        model: nn.Module,
        sparsity: Optional[float] = None,
        *,
        macs: Optional[float] = None,
        params: Optional[float] = None,
        structure: str = "global",
        filter_norm: str = "l2",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        total_steps: Optional[int] = None,
        n: int = 2,
        m: int = 4,
        loss_fn=None,
        compute_loss=None,
        include=None,
        exclude=None,
    ) -> None:
        self.sparsity_target, self.budget = check_target(sparsity, macs, params, structure)
        _check_structure(structure, self.sparsity_target or 0.0, n, m)
        self.filter_norm = _check_filter_norm(filter_norm, structure)
        self.structure = structure
        super().__init__(model, total_steps=total_steps, loss_fn=loss_fn, compute_loss=compute_loss,
                         include=include, exclude=exclude, structure=structure)
        self._freeze_scores()
        self.param_groups = {"weights": SGDGroup("weights", self._lower_params(), lr, momentum, weight_decay)}
        _project_into(self, self._weights(), 1.0 - (self.sparsity_target or 0.0), structure, n, m,
                      filter_norm=self.filter_norm, budget=self.budget)

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """One SGD step on ``batch`` under the fixed mask (``batch2`` is ignored)."""
        return self._sgd_step("weights", batch)
