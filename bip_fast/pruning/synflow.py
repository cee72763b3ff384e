"""SynFlow: data-free iterative pruning by synaptic flow, then training under the fixed mask."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ._validate import Batch
from .saliency import OneShotPruner, plain_copy

__all__ = ["SynFlow", "synflow_scores"]


def synflow_scores(model: nn.Module, input_shape: Sequence[int]) -> List[torch.Tensor]:
    """Synaptic-flow scores |z ⊙ ∂R/∂z| of every masked module's weight z = m⊙θ.

    On a float64 copy in eval mode whose floating parameters and buffers are all replaced by
    their absolute values (so z becomes |z|), R = Σ f(1), the sum of the outputs for one all-ones
    input of shape ``(1, *input_shape)``. Pruned weights score 0. The scores are divided by their
    maximum before the cast to float32 (float64 flows overflow float32 in deep networks); the
    ranking is unchanged up to that rounding. The model is left untouched.
    """
    net, weights = plain_copy(model, torch.float64)
    net.eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=weights[0].device)
    grads = torch.autograd.grad(net(x).sum(), weights)
    scores = [(w.detach() * g).abs() for w, g in zip(weights, grads)]
    top = max(float(s.max()) for s in scores)
    if top > 0:
        scores = [s / top for s in scores]
    return [s.to(torch.float32) for s in scores]


class SynFlow(OneShotPruner):
    """SynFlow (Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by
    iteratively conserving synaptic flow", NeurIPS 2020).

    ``prepare(batches)`` reads only the input shape (of the first batch's inputs, without the
    batch dimension) and prunes in ``rounds`` rounds on the exponential schedule: round
    k = 1..n scores the current network (:func:`synflow_scores`) and keeps the
    round(d^(k/n)·N) largest among the weights still kept, d = 1 − sparsity, so round n keeps
    exactly K = round(d·N). The network then trains under that mask
    (:class:`~bip_fast.pruning.saliency.OneShotPruner`). Published settings: n = 100 rounds,
    exponential schedule, global scope; ``lr=0.1``, momentum 0.9, weight decay 5e-4 and a cosine
    schedule are the engine's CIFAR training defaults (as for OMP).
    """

    name = "synflow"

    def __init__(self, model: nn.Module, sparsity: float, *, rounds: int = 100, **kwargs) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise TypeError(f"rounds: expected an int, got {type(rounds).__name__}")
        if rounds < 1:
            raise ValueError(f"rounds: expected an int >= 1, got {rounds}")
        self.rounds = rounds
        super().__init__(model, sparsity, **kwargs)

    def _cut(self, batches: List[Batch]) -> None:
        shape = tuple(batches[0][0].shape[1:])
        density = 1.0 - self.sparsity_target
        for k in range(1, self.rounds + 1):
            self._apply(synflow_scores(self._net, shape), density ** (k / self.rounds))
