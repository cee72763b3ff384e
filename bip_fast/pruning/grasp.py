"""GraSP: gradient-signal-preserving pruning (Hessian-gradient product score), then training."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._tree import map_floating
from ._validate import Batch, _check_number
from .saliency import OneShotPruner, accumulate_grads, batch_loss, check_batches, plain_copy

__all__ = ["GraSP", "grasp_scores"]


class _Tempered(nn.Module):
    """``net`` with every floating-point tensor of its output divided by ``temperature`` (the
    softened logits, for a ``compute_loss`` that computes the loss itself); any other attribute
    is ``net``'s."""

    def __init__(self, net: nn.Module, temperature: float) -> None:
        super().__init__()
        self.net = net
        self.temperature = temperature

    def forward(self, *args, **kwargs):
        return map_floating(self.net(*args, **kwargs), lambda t: t / self.temperature)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)


def grasp_scores(model: nn.Module, batches: Sequence[Batch], loss_fn=None,
                 temperature: float = 200.0, compute_loss=None) -> List[torch.Tensor]:
    """GraSP keep-scores z ⊙ Hg of every masked module's weight z = m⊙θ (keep the largest).

    With ℓ_b = ``loss_fn(model(x_b) / temperature, y_b)`` (default cross-entropy), or
    ``compute_loss(model', b)`` for batches in any structure of tensors, model' being the model
    with every floating-point tensor of its output divided by ``temperature``:
    g = Σ_b ∂ℓ_b/∂z (first pass), then Hg = Σ_b ∂(g·∂ℓ_b/∂z)/∂z with g held constant (second
    pass, one Hessian-vector product per batch). GraSP's published score is S = −z ⊙ Hg and it
    removes the largest S; this returns −S = z ⊙ Hg so that, as for every method here, the
    largest scores are kept. Computed on a copy in the model's current train/eval mode; the
    model is left untouched. Returns float32 tensors shaped like the weights.
    """
    batches = check_batches(batches, any_structure=compute_loss is not None)
    t = _check_number(temperature, "temperature", low=0.0, low_inclusive=False)
    net, weights = plain_copy(model)
    if compute_loss is None:
        loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        first = lambda net_, b: loss_fn(net_(b[0]) * (1.0 / t), b[1])  # noqa: E731
        second = lambda net_, b: loss_fn(net_(b[0]) / t, b[1])  # noqa: E731
    else:
        user = batch_loss(compute_loss=compute_loss)
        first = second = lambda net_, b: user(_Tempered(net_, t), b)  # noqa: E731
    g = accumulate_grads(net, weights, batches, first)
    hg = [torch.zeros_like(w) for w in weights]
    # Only the math attention kernel has a second derivative (the fused CPU/GPU ones do not).
    with sdpa_kernel([SDPBackend.MATH]):
        for batch in batches:
            gf = torch.autograd.grad(second(net, batch), weights, create_graph=True)
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
        loss_fn = None if self.compute_loss is not None else self.loss_fn
        scores = grasp_scores(self._net, batches, loss_fn, self.temperature, self.compute_loss)
        self._apply(scores, 1.0 - self.sparsity_target)
