"""Coupled channel groups of a traced model, and the ``"group"`` mask structure.

A channel can leave a network only if every layer that produces it drops it: in a ResNet the convs
that feed one skip-add (and the downsample branch) write the same channels, and every layer that
reads them must lose the matching input slice. :func:`find_groups` traces the model once with
Torch-Pruning's dependency graph and returns those couplings as :class:`ChannelGroups`; a channel of
a group is the set of weight slices (filters, input slices, BatchNorm entries) that live or die
together. :func:`attach_groups` also caches them on the model, and makes the BatchNorm layers of
the groups channel-masked (:class:`bip_fast.nn.MaskedBatchNorm2d`), so that ``structure="group"``
of every algorithm can use them::

    bip_fast.attach_groups(model, torch.randn(1, 3, 224, 224))
    alg = bip_fast.BiP(model, 0.5, structure="group")

Projection (:func:`project_groups`): a channel's score is the root-mean-square of the scores of
all its member slices (every masked conv / linear that produces or reads it; see there why the
mean), or with ``filter_norm="l1"`` their mean absolute value; each group keeps
``max(1, round(density · channels))`` channels, exactly, ties to the lower channel index
(``within``: of the channels that the current masks still keep, for iterative pruning), and
every layer that produces channels of a group keeps at least one of them (a merged group's layers
produce parts of its channels; see :func:`_every_producer_keeps_one`). A
removed channel is masked in every member: filters, input slices, biases and BatchNorm scale and
shift, so it outputs exactly 0 and :func:`bip_fast.compact` can cut it out without changing the
function.

With a budget (``macs=`` / ``params=`` of the algorithms, ``budget=`` here) the groups do not keep
the same fraction each: all their channels compete in one ranking of score mass per MAC (or
parameter) until the model fits the budget; see :mod:`bip_fast.masks.budget`, whose layer costs
:func:`attach_groups` measures on its example input.

The tracing and merging of the groups, and which groups are kept whole, are in
:mod:`bip_fast.masks.group_trace`. A group with a conv / linear layer that is not masked
(include / exclude) is kept whole too, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..nn.convert import mask_norms
from ..nn.norm import MASKED_NORM_TYPES
from ..ops import keep_count
from .budget import COSTS_ATTR, Budget, costs_of, measure_costs, record, select
from .group_trace import ChannelGroup, ChannelGroups, Member, call_model, discover_groups, plain_copy

GROUPS_ATTR = "_bip_fast_channel_groups"

__all__ = ["Member", "ChannelGroup", "ChannelGroups", "find_groups", "attach_groups", "groups_of",
           "project_groups", "call_model"]


def find_groups(model: nn.Module, example_inputs) -> ChannelGroups:
    """The coupled channel groups of ``model`` (plain or masked), traced on ``example_inputs``
    (a tensor, a tuple of positional inputs or a dict of keyword inputs). The model is not
    changed: a plain copy is traced (in eval mode)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return discover_groups(plain_copy(model), example_inputs)


def attach_groups(model: nn.Module, example_inputs) -> ChannelGroups:
    """:func:`find_groups`, cached on ``model`` for ``structure="group"``; the BatchNorm layers of
    prunable groups become channel-masked in place (same parameters, buffers and state-dict keys
    plus ``channel_mask``). Call it once, before constructing the algorithm; returns the groups.
    It also measures the layers' MACs and parameters on ``example_inputs`` for a ``macs=`` /
    ``params=`` budget (:mod:`bip_fast.masks.budget`): give it the input size the model will run at."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    plain = plain_copy(model)
    costs = measure_costs(plain, example_inputs)
    groups = discover_groups(plain, example_inputs)
    mask_norms(model, [m.name for g in groups if g.prunable for m in g.members if m.kind == "norm"])
    object.__setattr__(model, GROUPS_ATTR, groups)
    object.__setattr__(model, COSTS_ATTR, costs)
    return groups


def groups_of(model: nn.Module) -> ChannelGroups:
    groups = getattr(model, GROUPS_ATTR, None)
    if groups is None:
        raise ValueError("structure: 'group' needs the model's channel groups; call "
                         "bip_fast.attach_groups(model, example_inputs) before constructing the algorithm")
    return groups


# ----------------------------------------------------------------------------- projection
def _on_device(groups: ChannelGroups, device) -> list:
    key = str(device)
    if key not in groups._device_cache:
        groups._device_cache[key] = [[(m, m.index.to(device), m.channel.to(device)) for m in g.members]
                                     for g in groups.groups]
    return groups._device_cache[key]


def _slice_sums(s: torch.Tensor, dim: int, filter_norm: str = "l2") -> torch.Tensor:
    """Per slice along ``dim``: the sum of squares of its entries ("l2") or of their magnitudes ("l1")."""
    rows = s.detach().to(torch.float32).transpose(0, dim).reshape(s.shape[dim], -1)
    return rows.pow(2).sum(dim=1) if filter_norm == "l2" else rows.abs().sum(dim=1)


def _channel_sums(groups_on_device: list, channels: int, names: Dict[str, int], scores: Sequence[torch.Tensor],
                  filter_norm: str = "l2"):
    """Per channel of one group: (Σ s² (``"l1"``: Σ |s|) over its members' entries, their number)."""
    dev = scores[0].device
    sq = torch.zeros(channels, dtype=torch.float32, device=dev)
    count = torch.zeros(channels, dtype=torch.float32, device=dev)
    for m, idx, ch in groups_on_device:
        if m.kind in ("out", "in"):
            s = scores[names[m.name]]
            sq.index_add_(0, ch, _slice_sums(s, m.dim, filter_norm)[idx])
            count.index_add_(0, ch, torch.full(ch.shape, float(s.numel() // s.shape[m.dim]), device=dev))
    return sq, count


def channel_scores(groups_on_device: list, channels: int, names: Dict[str, int],
                   scores: Sequence[torch.Tensor], filter_norm: str = "l2") -> torch.Tensor:
    """The score of each channel of one group: the root-mean-square of its members' score entries,
    sqrt(Σ s² / n) over the n entries of every filter and input slice that carries the channel
    (``filter_norm="l1"``: their mean absolute value, Σ |s| / n).

    A mean, not the L2 norm (sqrt(Σ s²)), because the channels of one group need not live in the
    same layers: a channel-padding shortcut (the CIFAR ResNets' option A) merges the 16-, 32- and
    64-channel stages into one 64-channel group, where a channel of the first stage is carried by
    the layers of all three stages and a channel added by the last padding only by the last stage.
    Under the L2 norm a channel carried by more layers scores higher at equal score entries, so
    the first stage's channels are kept first; the mean compares the channels by their scores.
    The layers' score scales still count, as in the global structure (magnitude scores of a
    ResNet at initialisation are larger in the narrow first stage, and favour its channels).
    Where every channel of a group has the same members (no padding) the mean is the L2 norm
    divided by one constant and keeps the same channels. Exact K is unchanged: the top-K runs on
    these per-channel values."""
    sq, count = _channel_sums(groups_on_device, channels, names, scores, filter_norm)
    mean = sq / count.clamp_min(1)
    return mean.sqrt() if filter_norm == "l2" else mean


def _alive_channels(groups_on_device: list, channels: int, names: Dict[str, int],
                    within: Sequence[torch.Tensor]) -> torch.Tensor:
    """The channels of one group that the masks ``within`` still keep somewhere (a kept entry in
    one of the filters or input slices that carry them)."""
    hits = torch.zeros(channels, dtype=torch.float32, device=within[0].device)
    for m, idx, ch in groups_on_device:
        if m.kind in ("out", "in"):
            w = within[names[m.name]]
            hits.index_add_(0, ch, w.transpose(0, m.dim).reshape(w.shape[m.dim], -1).any(dim=1)[idx].float())
    return hits > 0


def _every_producer_keeps_one(keep: torch.Tensor, value: torch.Tensor, mems: list,
                              alive: Optional[torch.Tensor], group: ChannelGroup, short: list) -> torch.Tensor:
    """Swap channels so that every layer producing channels of the group (an ``"out"`` member)
    keeps at least one of them, without changing how many the group keeps.

    Only merged groups need it: where a channel-padding shortcut joins stages, a layer produces
    part of the group's channels (ResNet-8's stem: 16 of 64), and at high sparsity the top-K can
    land on the other layers' channels only, leaving a layer with no output, which disconnects
    the network (every later layer sees a constant). Each empty layer gets its best channel back
    (of those ``alive``, if given) in exchange for the lowest-valued kept channel that is not the
    last one of some layer; where no such exchange exists (more producing layers than kept
    channels) the layer stays empty and ``short`` records the group."""
    producers = [ch for m, _, ch in mems if m.kind == "out" and ch.numel()]
    if len(producers) < 2 or all(bool(keep[ch].any()) for ch in producers):
        return keep
    keep = keep.clone()
    for ch in producers:
        if bool(keep[ch].any()):
            continue
        cand = ch if alive is None else ch[alive[ch]]
        if cand.numel() == 0:
            continue  # every channel of this layer is already removed (iterative pruning)
        droppable = keep.clone()
        for other in producers:
            kept = other[keep[other]]
            if kept.numel() == 1:
                droppable[kept] = False
        if not bool(droppable.any()):
            short.append(group.members[0].name)
            break
        drop_value = torch.where(droppable, value, torch.full_like(value, float("inf")))
        keep[int(torch.argmin(drop_value))] = False  # first index among ties
        keep[int(cand[torch.argmax(value[cand])])] = True
    return keep


def project_groups(model: nn.Module, names: Sequence[str], scores: Sequence[torch.Tensor], density: float,
                   backend: Optional[str] = None, filter_norm: str = "l2",
                   within: Optional[Sequence[torch.Tensor]] = None, budget: Optional[Budget] = None):
    """Group-structure masks: ``(weight masks, one per name; {name: bool vector})``, the vectors
    being the bias masks of removed filters and the channel masks of BatchNorm layers. Each group
    keeps its channels of highest :func:`channel_scores` (root-mean-square over the members, or
    mean absolute value with ``filter_norm="l1"``).

    ``names`` / ``scores``: the masked modules of ``model`` and their scores, in the same order.
    ``within``: the current weight masks (same order); only the channels they still keep compete,
    each group keeps ``max(1, round(density · remaining))`` of them, and the weight masks keep
    nothing outside ``within`` (iterative pruning: a removed channel stays removed).
    ``budget`` (:class:`~bip_fast.masks.budget.Budget`; ``density`` is then unused): the channels
    of all groups compete in one ranking of score mass per MAC (or parameter) until the model fits
    the budget (:func:`bip_fast.masks.budget.select`); the budget and where it landed are noted on
    the model for :func:`bip_fast.sparsity_report`."""
    if filter_norm not in ("l2", "l1"):
        raise ValueError(f"filter_norm: expected one of ('l2', 'l1'), got {filter_norm!r}")
    if within is not None and (len(within) != len(scores) or any(w.shape != s.shape for w, s in zip(within, scores))):
        raise ValueError(f"within: expected one mask per scores tensor, of its shape, got {len(within)} masks")
    if budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"budget: expected a bip_fast.masks.budget.Budget, got {type(budget).__name__}")
    groups = groups_of(model)
    pos = {n: i for i, n in enumerate(names)}
    masks = [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    vectors: Dict[str, torch.Tensor] = {}
    if not scores:
        return masks, vectors
    dev = scores[0].device
    skipped, short, active = [], [], []
    for gi, (g, mems) in enumerate(zip(groups.groups, _on_device(groups, dev))):
        if not g.prunable:
            continue
        unmasked = [m.name for m, _, _ in mems if m.kind in ("out", "in") and m.name not in pos]
        if unmasked:
            skipped.append(unmasked[0])
            continue
        active.append((gi, g, mems))
    if budget is not None:
        keeps = _budget_keeps(model, groups, active, pos, scores, filter_norm, within, budget)
    else:
        keeps = []
        for _, g, mems in active:
            value = channel_scores(mems, g.channels, pos, scores, filter_norm)
            if within is None:
                keep = ops.topk_masks([value], max(1, keep_count(g.channels, density)), backend=backend)[0]
            else:
                alive = _alive_channels(mems, g.channels, pos, within)
                keep = torch.zeros_like(alive)
                if bool(alive.any()):
                    keep[alive] = ops.topk_masks([value[alive]], max(1, keep_count(int(alive.sum()), density)),
                                                 backend=backend)[0]
            keeps.append(_every_producer_keeps_one(keep, value, mems, None if within is None else alive, g, short))
    for (_, g, mems), keep in zip(active, keeps):
        for m, idx, ch in mems:
            if m.kind == "pad":
                continue
            if m.kind == "norm":
                size = model.get_submodule(m.name).num_features
            else:
                size = scores[pos[m.name]].shape[m.dim]
            vec = torch.ones(size, dtype=torch.bool, device=dev)
            vec[idx] = keep[ch]
            if m.kind == "norm":
                vectors[m.name] = vectors[m.name] & vec if m.name in vectors else vec
                continue
            i = pos[m.name]
            shape = [1] * masks[i].dim()
            shape[m.dim] = -1
            masks[i] &= vec.view(shape)
            if m.kind == "out":
                vectors[m.name] = vectors[m.name] & vec if m.name in vectors else vec
    if within is not None:
        masks = [mk & w for mk, w in zip(masks, within)]
    if short:
        warnings.warn(f"structure='group': {len(short)} channel group(s) keep fewer channels than they have "
                      f"producing layers (e.g. {short[0]!r}), so a layer outputs no channel at all; lower the "
                      f"sparsity", UserWarning, stacklevel=3)
    if skipped and not groups._warned:
        groups._warned = True
        warnings.warn(f"structure='group': {len(skipped)} channel group(s) hold a conv / linear layer that is not "
                      f"masked (e.g. {skipped[0]!r}) and are kept whole", UserWarning, stacklevel=3)
    return masks, vectors


def _budget_keeps(model: nn.Module, groups: ChannelGroups, active: list, pos: Dict[str, int],
                  scores: Sequence[torch.Tensor], filter_norm: str, within, budget: Budget) -> list:
    """The kept channels of each ``active`` group under ``budget``: their score mass (Σ s², or Σ |s|
    with ``"l1"``) over all members, ranked across groups per unit of cost by
    :func:`bip_fast.masks.budget.select`."""
    costs = costs_of(model)
    if not active:
        return []
    value = torch.cat([_channel_sums(mems, g.channels, pos, scores, filter_norm)[0] for _, g, mems in active])
    alive = None if within is None else torch.cat([_alive_channels(mems, g.channels, pos, within)
                                                   for _, g, mems in active])
    ids = [gi for gi, _, _ in active]
    keep, cost = select(groups, costs, ids, value, alive, budget)
    record(model, groups, costs, ids, keep, budget, cost)
    return list(keep.split([g.channels for _, g, _ in active]))


def apply_group_vectors(model: nn.Module, vectors: Dict[str, torch.Tensor]) -> None:
    """Copy the bias masks and BatchNorm channel masks of :func:`project_groups` into the model."""
    for name, vec in vectors.items():
        mod = model.get_submodule(name)
        if isinstance(mod, MASKED_NORM_TYPES):
            mod.set_channel_mask(vec)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"model: BatchNorm {name!r} of a channel group is not channel-masked; call "
                             f"bip_fast.attach_groups(model, example_inputs) on this model")
        elif getattr(mod, "bias", None) is not None:
            mod.set_bias_mask(vec)
