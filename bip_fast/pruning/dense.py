"""Dense: ordinary SGD training, e.g. the pretraining BiP, OMP and Hydra start from (SPEC §5)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .base import Algorithm, SGDGroup
from ._validate import Batch

__all__ = ["Dense"]


class Dense(Algorithm):
    """Plain SGD (momentum, weight decay, optional cosine) over every trainable parameter.

    The model is *not* sparsified: a model of plain nn layers trains at full speed and its state
    dict loads anywhere. If it already holds masked modules their masks are respected (forward
    uses m⊙θ) and left unchanged, and their scores are not trained (score gradients switched
    off once at construction). ``batch2`` is ignored.
    """

    name = "dense"
    uses_masks = False

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        total_steps: Optional[int] = None,
        loss_fn=None,
        compute_loss=None,
    ) -> None:
        super().__init__(model, total_steps=total_steps, loss_fn=loss_fn, compute_loss=compute_loss)
        self._freeze_scores()
        params = self._lower_params()
        if not params:
            raise ValueError("model: has no trainable parameters")
        self.param_groups = {"weights": SGDGroup("weights", params, lr, momentum, weight_decay)}

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """One SGD step on ``batch`` (``batch2`` is ignored)."""
        return self._sgd_step("weights", batch)
