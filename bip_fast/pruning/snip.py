"""SNIP: single-shot pruning by connection sensitivity, then training under the fixed mask."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ._validate import Batch
from .saliency import OneShotPruner, accumulate_grads, batch_loss, check_batches, plain_copy

__all__ = ["SNIP", "snip_scores"]


def snip_scores(model: nn.Module, batches: Sequence[Batch], loss_fn=None,
                compute_loss=None) -> List[torch.Tensor]:
    """Connection sensitivity |z ⊙ Σ_b ∂ℓ_b/∂z| of every masked module's weight z = m⊙θ.

    ℓ_b = ``loss_fn(model(x_b), y_b)`` (default cross-entropy), or ``compute_loss(model, b)`` for
    batches in any structure of tensors, in the model's current train/eval
    mode, summed over ``batches``; computed on a copy, so the model (its normalisation statistics
    included) is left untouched. SNIP's normalisation by Σ|·| does not change the ranking and is
    left out. Returns float32 tensors shaped like the weights, in registration order.
    """
    batches = check_batches(batches, any_structure=compute_loss is not None)
    net, weights = plain_copy(model)
    grads = accumulate_grads(net, weights, batches, batch_loss(loss_fn, compute_loss))
    return [(w.detach() * g).abs().to(torch.float32) for w, g in zip(weights, grads)]


class SNIP(OneShotPruner):
    """SNIP (Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR 2019).

    ``prepare(batches)`` scores every prunable weight by its connection sensitivity
    |θ ⊙ ∂ℓ/∂θ| (:func:`snip_scores`, train-mode forward, gradients summed over the batches) and
    keeps the K = round((1 − sparsity)·N) largest over all layers; the network then trains under
    that mask (:class:`~bip_fast.pruning.saliency.OneShotPruner`). The paper computes the scores
    on one mini-batch of training data at initialisation, so one training batch is the intended
    input (with ``compute_loss``: one batch as :meth:`step` takes it); ``lr=0.1``, momentum 0.9, weight decay 5e-4 and a cosine schedule are the engine's
    CIFAR training defaults (as for OMP), not the paper's.
    """

    name = "snip"

    def _cut(self, batches: List[Batch]) -> None:
        if not self._net.training:
            self._net.train()
        loss_fn = None if self.compute_loss is not None else self.loss_fn
        self._apply(snip_scores(self._net, batches, loss_fn, self.compute_loss), 1.0 - self.sparsity_target)
