"""Shared machinery of the saliency baselines (SNIP, GraSP, SynFlow) and of GMP.

- :func:`keep_largest`: exact top-K of *signed* scores among the currently kept weights, on the
  engine's radix top-K (:func:`bip_fast.ops.topk_masks`, which ranks by |s|): positive scores are
  ranked directly; when K exceeds their count, the remaining places go to the non-positive scores
  closest to zero (the complement of a top-|s| selection over them). Ties go to the earlier entry
  (layer registration order, then row-major flat index), as in SPEC §2. Entries already pruned
  never come back, so a cut only ever removes weights.
- :func:`select_masks`: that selection with K = round(d·N) over all prunable weights
  (``"global"``) or K_l = round(d·N_l) per layer (``"layer"``).
- :func:`plain_copy`: a deep copy of a masked model with plain nn.Conv2d / nn.Linear layers whose
  weights are z = m⊙θ (:func:`bip_fast.nn.finalize`), for the score passes: it is twice
  differentiable (GraSP's Hessian-vector product), can change dtype (SynFlow's float64) and runs
  train-mode forwards without touching the model's own normalisation statistics.
- :class:`MaskedSGD`: the constructor shared by the four baselines: OMP's retraining started at
  density 1, plus the sparsity target and a ``"global"`` / ``"layer"`` structure.
- :class:`OneShotPruner`: the algorithm shape shared by SNIP, GraSP and SynFlow: construct,
  ``prepare(batches)`` once (scores, then the cut), then ``step(batch)`` trains every parameter
  with SGD under the fixed mask, exactly like OMP's retraining.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..masks import keep_count
from ..nn import finalize, masked_modules
from ._validate import (Batch, _check_any_batch, _check_batch, _check_choice, _check_loss_args, _check_loss_value,
                        check_sparsity)
from .omp import OMP

__all__ = ["SELECT_STRUCTURES", "keep_largest", "select_masks", "plain_copy", "check_batches", "accumulate_grads",
           "batch_loss", "MaskedSGD", "OneShotPruner"]

SELECT_STRUCTURES = ("global", "layer")


def _keep_largest_1d(v: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the ``keep`` largest values of the 1-D float32 ``v`` (ties: lower index)."""
    pos = v > 0
    n_pos = int(pos.sum())
    if keep <= n_pos:  # only positive scores are kept: rank them by |s|, zeroing the rest
        return ops.topk_masks([torch.where(pos, v, torch.zeros((), dtype=v.dtype, device=v.device))], keep)[0]
    out = pos.clone()
    idx = torch.nonzero(~pos).flatten()  # non-positive entries, in order
    drop = idx.numel() - (keep - n_pos)
    # Drop the most negative ones. Flipped, so that among equal values the later entry is dropped
    # and the earlier one kept.
    mags = (-v[idx]).flip(0)
    dropped = ops.topk_masks([mags], drop)[0].flip(0)
    out[idx[~dropped]] = True
    return out


def keep_largest(scores: Sequence[torch.Tensor], current: Sequence[torch.Tensor], keep: int) -> List[torch.Tensor]:
    """Bool masks with exactly ``keep`` True entries: the largest signed ``scores`` among the
    entries where ``current`` (bool, same shapes) is True. Raises ValueError when fewer than
    ``keep`` entries are current or a candidate score is NaN / inf."""
    scores, current = list(scores), list(current)
    if len(scores) != len(current):
        raise ValueError(f"current: expected {len(scores)} masks like scores, got {len(current)}")
    for i, (s, c) in enumerate(zip(scores, current)):
        if not isinstance(c, torch.Tensor) or c.dtype != torch.bool or c.shape != s.shape:
            raise ValueError(f"current[{i}]: expected a bool tensor of shape {tuple(s.shape)} like scores[{i}], "
                             f"got {getattr(c, 'dtype', type(c).__name__)} {tuple(getattr(c, 'shape', ()))}")
    flat_c = [c.reshape(-1) for c in current]
    cand = torch.cat([s.detach().to(torch.float32).reshape(-1)[c] for s, c in zip(scores, flat_c)])
    if not 0 <= keep <= cand.numel():
        raise ValueError(f"keep: expected a value in [0, {cand.numel()}] (currently kept weights), got {keep}")
    if not bool(torch.isfinite(cand).all()):
        raise ValueError("scores: contain NaN or inf")
    sel = _keep_largest_1d(cand, keep)
    out, off = [], 0
    for c in flat_c:
        n = int(c.sum())
        m = torch.zeros_like(c)
        m[c] = sel[off:off + n]
        off += n
        out.append(m)
    return [m.view(s.shape) for m, s in zip(out, scores)]


def select_masks(scores: Sequence[torch.Tensor], current: Sequence[torch.Tensor], density: float,
                 structure: str = "global") -> List[torch.Tensor]:
    """Masks keeping a fraction ``density`` of all prunable weights, by signed score, among the
    current ones: K = round(d·N) over all layers (``"global"``) or per layer (``"layer"``)."""
    _check_choice(structure, "structure", SELECT_STRUCTURES)
    scores, current = list(scores), list(current)
    if structure == "global":
        return keep_largest(scores, current, keep_count(sum(s.numel() for s in scores), density))
    return [keep_largest([s], [c], keep_count(s.numel(), density))[0] for s, c in zip(scores, current)]


def plain_copy(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, List[nn.Parameter]]:
    """(copy, weights): a deep copy of ``model`` whose masked modules are plain layers with weight
    m⊙θ, and those weights in masked-module registration order (the tie-break order)."""
    named = masked_modules(model)
    if not named:
        raise ValueError("model: has no masked modules (sparsify it first)")
    net = finalize(copy.deepcopy(model))
    if dtype is not None:
        net = net.to(dtype)
    # the plain layer keeps the masked weight's name (attention: in_proj_weight)
    weights = [getattr(net.get_submodule(n), m._weight_key) for n, m in named]
    for w in weights:
        w.requires_grad_(True)
    return net, weights


def check_batches(batches, name: str = "batches", any_structure: bool = False) -> List[Batch]:
    """A non-empty list of (inputs, targets) tensor pairs from any iterable of them (with
    ``any_structure``, of batches in any structure of tensors, for ``compute_loss``)."""
    what = "batches" if any_structure else "(inputs, targets) batches"
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{name}: expected an iterable of {what}, got {type(batches).__name__}")
    check = _check_any_batch if any_structure else _check_batch
    out = [check(b, f"{name}[{i}]") for i, b in enumerate(batches)]
    if not out:
        raise ValueError(f"{name}: expected at least one of the {what}, got none")
    return out


def batch_loss(loss_fn=None, compute_loss=None) -> Callable:
    """The loss of one score batch as ``f(net, batch)``: ``compute_loss(net, batch)``, else
    ``loss_fn(net(x), y)`` (cross-entropy by default)."""
    _check_loss_args(loss_fn, compute_loss)
    if compute_loss is not None:
        return lambda net, batch: _check_loss_value(compute_loss(net, batch))
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    return lambda net, batch: loss_fn(net(batch[0]), batch[1])


def accumulate_grads(net: nn.Module, weights: List[nn.Parameter], batches: Sequence[Batch],
                     loss: Callable) -> List[torch.Tensor]:
    """Σ_b ∂ loss(net, batch_b) / ∂weights, one backward per batch (``loss``: see :func:`batch_loss`)."""
    total = [torch.zeros_like(w) for w in weights]
    for b in batches:
        gs = torch.autograd.grad(loss(net, b), weights)
        for t, g in zip(total, gs):
            t.add_(g)
    return total


class MaskedSGD(OMP):
    """Common shape of the baselines: OMP's retraining (one SGD group "weights" over the masked
    weights, biases and norm parameters; ``lr``, ``momentum``, ``weight_decay``, cosine over
    ``total_steps``; scores not trained), started at density 1 (every weight kept), with the
    sparsity target and a ``"global"`` / ``"layer"`` structure for the subclass's own cut.
    Keyword arguments are OMP's (``lr``, ``momentum``, ``weight_decay``, ``total_steps``,
    ``loss_fn``, ``include``, ``exclude``).
    """

    name = "masked_sgd"

    def __init__(self, model: nn.Module, sparsity: float, *, structure: str = "global", **kwargs) -> None:
        target = check_sparsity(sparsity)
        _check_choice(structure, "structure", SELECT_STRUCTURES)
        super().__init__(model, 0.0, structure=structure, **kwargs)
        self.sparsity_target = target
        self._net = self.model  # the plain model, even if ``model`` is later routed through a wrapper


class OneShotPruner(MaskedSGD):
    """Prune once from saliency scores, then train under the fixed mask (SNIP, GraSP, SynFlow).

    ``prepare(batches)`` must be called once before the first ``step``: it computes the method's
    scores (:meth:`_cut`) and projects them to exactly K = round((1 − sparsity)·N) kept weights
    (``structure="global"``, the published setting) or K_l per layer (``"layer"``).
    ``step(batch)`` is then one SGD step under that mask, exactly like OMP's retraining;
    ``batch2`` is ignored. ``state_dict()`` records whether the cut was made, so a resumed run
    needs no second ``prepare``.
    """

    name = "oneshot"

    def __init__(self, model: nn.Module, sparsity: float, **kwargs) -> None:
        super().__init__(model, sparsity, **kwargs)
        self.prepared = False

    def _cut(self, batches: List[Batch]) -> None:
        raise NotImplementedError

    def _apply(self, scores: Sequence[torch.Tensor], density: float) -> None:
        """Keep the largest ``scores`` (signed) among the current weights, at ``density``."""
        self._set_masks(select_masks(scores, self.masks(), density, self.structure))

    def prepare(self, batches=None) -> None:
        """Compute the scores from ``batches`` (an iterable of (inputs, targets) tensor pairs on the
        model's device; with ``compute_loss``, of batches as :meth:`step` takes them) and make the
        one cut. Call once, before the first :meth:`step`."""
        if self.prepared:
            raise RuntimeError(f"prepare: {self.name} has already pruned the model")
        self._cut(self._score_batches(batches))
        self.prepared = True

    def _score_batches(self, batches) -> List:
        return check_batches(batches, any_structure=self.compute_loss is not None)

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """One SGD step on ``batch`` under the fixed mask (``batch2`` is ignored)."""
        if not self.prepared:
            raise RuntimeError(f"step: call {type(self).__name__}.prepare(batches) before the first step")
        return self._sgd_step("weights", batch)

    def _extra_state(self) -> Dict[str, object]:
        return {"prepared": self.prepared, "structure": self.structure, "sparsity": self.sparsity_target}

    def _load_extra_state(self, sd: Dict[str, object]) -> None:
        if not isinstance(sd.get("prepared"), bool):
            raise ValueError(f"state_dict: 'prepared' must be a bool, got {sd.get('prepared')!r}")
        self.prepared = sd["prepared"]
