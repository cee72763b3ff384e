"""GraSP: gradient-signal-preserving pruning (Hessian-gradient product score), then training."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import Batch, _check_number
from .saliency import OneShotPruner, accumulate_grads, check_batches, plain_copy

__all__ = ["GraSP", "grasp_scores"]


def grasp_scores(model: nn.Module, batches: Sequence[Batch], loss_fn=None,
                 temperature: float = 200.0) -> List[torch.Tensor]:
    """GraSP keep-scores z ⊙ Hg of every masked module's weight z = m⊙θ (keep the largest).

    With ℓ_b = ``loss_fn(model(x_b) / temperature, y_b)`` (default cross-entropy):
    g = Σ_b ∂ℓ_b/∂z (first pass), then Hg = Σ_b ∂(g·∂ℓ_b/∂z)/∂z with g held constant (second
    pass, one Hessian-vector product per batch). GraSP's published score is S = −z ⊙ Hg and it
    removes the largest S; this returns −S = z ⊙ Hg so that, as for every method here, the
    largest scores are kept. Computed on a copy in the model's current train/eval mode; the
    model is left untouched. Returns float32 tensors shaped like the weights.
    """
    batches = check_batches(batches)
    t = _check_number(temperature, "temperature", low=0.0, low_inclusive=False)
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    net, weights = plain_copy(model)
    g = accumulate_grads(net, weights, batches, loss_fn, scale=1.0 / t)
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        gf = torch.autograd.grad(loss_fn(net(x) / t, y), weights, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, gf))
        for acc, h in zip(hg, torch.autograd.grad(dot, weights)):
            acc.add_(h)
    return [(w.detach() * h).to(torch.float32) for w, h in zip(weights, hg)]


class GraSP(OneShotPruner):
    """GraSP (Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving
    Gradient Flow", ICLR 2020).

    ``prepare(batches)`` computes the Hessian-gradient product score (:func:`grasp_scores`,
    train-mode forwards, logits divided by ``temperature``) and keeps the K = round((1 −
    sparsity)·N) weights with the smallest published score S = −θ⊙Hg over all layers (exact K;
    the authors' threshold keeps every tie); the network then trains under that mask
    (:class:`~bip_fast.pruning.saliency.OneShotPruner`). Published settings: temperature
    T = 200 and 10 training samples per class for the scores (the authors' code defaults);
    ``lr=0.1``, momentum 0.9, weight decay 5e-4 and a cosine schedule are the engine's CIFAR
    training defaults (as for OMP).
    """

    name = "grasp"

    def __init__(self, model: nn.Module, sparsity: float, *, temperature: float = 200.0, **kwargs) -> None:
        self.temperature = _check_number(temperature, "temperature", low=0.0, low_inclusive=False)
        super().__init__(model, sparsity, **kwargs)

    def _cut(self, batches: List[Batch]) -> None:
        if not self._net.training:
            self._net.train()
        scores = grasp_scores(self._net, batches, self.loss_fn, self.temperature)
        self._apply(scores, 1.0 - self.sparsity_target)
