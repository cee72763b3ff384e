"""SynFlow: data-free iterative pruning by synaptic flow, then training under the fixed mask."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ._tree import tensor_leaves
from ._validate import Batch
from .saliency import OneShotPruner, plain_copy

__all__ = ["SynFlow", "synflow_scores"]


def synflow_scores(model: nn.Module, input_shape: Sequence[int]) -> List[torch.Tensor]:
    """Synaptic-flow scores |z ⊙ ∂R/∂z| of every masked module's weight z = m⊙θ.

    On a float64 copy in eval mode whose floating parameters and buffers are all replaced by
    their absolute values (so z becomes |z|), R = Σ f(1), the sum of the outputs for one all-ones
    input of shape ``(1, *input_shape)`` (of every floating-point tensor of the output, if the
    model returns a dict or tuple). The model must take that one tensor. Pruned weights score 0. The scores are divided by their
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
    out = net(x)
    if isinstance(out, torch.Tensor):
        r = out.sum()
    else:
        leaves = [t.sum() for t in tensor_leaves(out) if t.is_floating_point()]
        if not leaves:
            raise TypeError(f"model: SynFlow sums the model's floating-point outputs, got {type(out).__name__} "
                            f"without one")
        r = torch.stack(leaves).sum()
    grads = torch.autograd.grad(r, weights)
    scores = [(w.detach() * g).abs() for w, g in zip(weights, grads)]
    top = max(float(s.max()) for s in scores)
    if top > 0:
        scores = [s / top for s in scores]
    return [s.to(torch.float32) for s in scores]


class SynFlow(OneShotPruner):
    """SynFlow (Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by
    iteratively conserving synaptic flow", NeurIPS 2020).

    ``prepare(batches)`` reads only the input shape (of the first batch's inputs, without the
    batch dimension, or ``input_shape`` when given; then ``batches`` may be None) and prunes in ``rounds`` rounds on the exponential schedule: round
    k = 1..n scores the current network (:func:`synflow_scores`) and keeps the
    round(d^(k/n)·N) largest among the weights still kept, d = 1 − sparsity, so round n keeps
    exactly K = round(d·N). The network then trains under that mask
    (:class:`~bip_fast.pruning.saliency.OneShotPruner`). Published settings: n = 100 rounds,
    exponential schedule, global scope; ``lr=0.1``, momentum 0.9, weight decay 5e-4 and a cosine
    schedule are the engine's CIFAR training defaults (as for OMP).

    SynFlow uses no data and no loss: its scores come from ``model(torch.ones(1, *input_shape))``,
    so the model must take one tensor. With ``compute_loss`` (batches of any structure) pass
    ``input_shape``; ``compute_loss`` then drives the training steps after the cut.
    """

    name = "synflow"

    def __init__(self, model: nn.Module, sparsity: float, *, rounds: int = 100,
                 input_shape: Optional[Sequence[int]] = None, **kwargs) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise TypeError(f"rounds: expected an int, got {type(rounds).__name__}")
        if rounds < 1:
            raise ValueError(f"rounds: expected an int >= 1, got {rounds}")
        self.rounds = rounds
        if input_shape is not None:
            if (isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
                raise ValueError(f"input_shape: expected a sequence of positive ints (one input without the "
                                 f"batch dimension), got {input_shape!r}")
            input_shape = tuple(input_shape)
        self.input_shape = input_shape
        super().__init__(model, sparsity, **kwargs)
        if self.compute_loss is not None and input_shape is None:
            raise ValueError("input_shape: SynFlow with compute_loss needs input_shape=(...), the shape of one "
                             "input without the batch dimension; its scores use no data or loss, only "
                             "model(torch.ones(1, *input_shape)), so the model must take one tensor")

    def _score_batches(self, batches) -> List:
        return [] if self.input_shape is not None else super()._score_batches(batches)

    def _cut(self, batches: List[Batch]) -> None:
        shape = self.input_shape if self.input_shape is not None else tuple(batches[0][0].shape[1:])
        density = 1.0 - self.sparsity_target
        for k in range(1, self.rounds + 1):
            self._apply(synflow_scores(self._net, shape), density ** (k / self.rounds))
