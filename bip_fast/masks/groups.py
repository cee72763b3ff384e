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

Projection (:func:`project_groups`): a channel's score is the L2 norm of the scores of all its
member slices (every masked conv / linear that produces or reads it); each group keeps
``max(1, round(density · channels))`` channels, exactly, ties to the lower channel index. A
removed channel is masked in every member: filters, input slices, biases and BatchNorm scale and
shift, so it outputs exactly 0 and :func:`bip_fast.compact` can cut it out without changing the
function.

Couplings come from Torch-Pruning's per-layer groups, merged where they share a slice (union-find),
so a channel padding shortcut (the CIFAR ResNets' option A, :class:`bip_fast.models.ShortcutA`)
couples a stage's channels with the matching channels of the next stage. A group is kept whole
(``reason`` says why) when it reaches the model's output, holds a grouped (not depthwise)
convolution, a BatchNorm without affine parameters, or a layer whose channels cannot be masked
exactly (LayerNorm, GroupNorm, PReLU, attention, embeddings, bare parameters). A group with a conv /
linear layer that is not masked (include / exclude) is kept whole too, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ops
from ..ops import keep_count

GROUPS_ATTR = "_bip_fast_channel_groups"

__all__ = ["Member", "ChannelGroup", "ChannelGroups", "find_groups", "attach_groups", "groups_of",
           "project_groups", "call_model"]


@dataclass(frozen=True)
class Member:
    """One layer's share of a group: ``index[i]`` of its dimension ``dim`` belongs to group channel
    ``channel[i]``. ``kind``: ``"out"`` (filters / output features), ``"in"`` (input channels),
    ``"norm"`` (BatchNorm entries), ``"pad"`` (output channels of a channel-padding shortcut)."""

    name: str
    kind: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    channels: int
    members: Tuple[Member, ...]
    reason: Optional[str] = None  # why the group is kept whole; None: prunable

    @property
    def prunable(self) -> bool:
        return self.reason is None


@dataclass
class ChannelGroups:
    """The coupled channel groups of one architecture (module names, so they survive sparsify,
    deepcopy and pickling). ``pad_inputs``: input channels of each channel-padding shortcut."""

    groups: List[ChannelGroup]
    pad_inputs: Dict[str, int] = field(default_factory=dict)
    _device_cache: Dict[object, list] = field(default_factory=dict, repr=False, compare=False)
    _warned: bool = field(default=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def summary(self) -> List[Dict[str, object]]:
        """One row per group: channels, member layers, and why it is kept whole (if it is)."""
        return [{"channels": g.channels, "members": sorted({m.name for m in g.members}), "reason": g.reason}
                for g in self.groups]

    def __getstate__(self):  # index tensors only; device copies are rebuilt
        return {"groups": self.groups, "pad_inputs": self.pad_inputs}

    def __setstate__(self, state):
        self.groups, self.pad_inputs = state["groups"], state["pad_inputs"]
        self._device_cache, self._warned = {}, False

    def __deepcopy__(self, memo):
        return ChannelGroups(copy.deepcopy(self.groups, memo), dict(self.pad_inputs))


# ----------------------------------------------------------------------------- tracing
def call_model(model: nn.Module, example_inputs):
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple or list, ``model(**x)`` for a dict."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with plain layers (masks baked in) and every parameter requiring grad: the
    dependency graph is traced through autograd."""
    from ..nn import finalize

    plain = finalize(copy.deepcopy(model))
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def _pad_types() -> tuple:
    from ..models import ShortcutA

    return (ShortcutA,)


def _pad_pruner(shapes: Dict[nn.Module, Tuple[int, int]]):
    from torch_pruning.pruner.function import BasePruningFunc

    class _ChannelPadPruner(BasePruningFunc):
        """Dependency-graph stand-in for a channel-padding shortcut: input channel j is output
        channel j + pad_lo (the index mapping is set on the edges). Removal is done by
        :func:`bip_fast.compact`, which rewrites the pads."""

        def prune_out_channels(self, layer, idxs):
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return shapes[layer][1] if layer in shapes else None

        def get_in_channels(self, layer):
            return shapes[layer][0] if layer in shapes else None

    return _ChannelPadPruner()


class _Offset:
    """Index mapping across a channel-padding shortcut (forward: +lo; reverse: −lo, dropping the
    padded channels)."""

    def __init__(self, lo: int, n_in: int, reverse: bool) -> None:
        self.lo, self.n_in, self.reverse = lo, n_in, reverse

    def __call__(self, idxs):
        from torch_pruning import _helpers

        if not self.reverse:
            return [_helpers._HybridIndex(idx=i.idx + self.lo, root_idx=i.root_idx) for i in idxs]
        return [_helpers._HybridIndex(idx=i.idx - self.lo, root_idx=i.root_idx) for i in idxs
                if self.lo <= i.idx < self.lo + self.n_in]


def _build_graph(plain: nn.Module, example_inputs):
    """Torch-Pruning's dependency graph of ``plain``, with channel-padding shortcuts mapped."""
    import torch_pruning as tp

    pad_types = _pad_types()
    shapes: Dict[nn.Module, Tuple[int, int]] = {}  # (in, out) channels
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.__setitem__(mod, (int(inp[0].shape[1]),
                                                                                     int(out.shape[1]))))
             for m in plain.modules() if isinstance(m, pad_types)]  # tracing-time only, on a copy
    try:
        with torch.no_grad():
            was = plain.training
            plain.eval()
            call_model(plain, example_inputs)
            plain.train(was)
    finally:
        for h in hooks:
            h.remove()
    pruner = _pad_pruner(shapes)
    outputs: list = []

    def forward(model, inputs):
        outputs.append(call_model(model, inputs))
        return outputs[-1]

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on unknown ops: those ops are checked below
        dg = tp.DependencyGraph().build_dependency(
            plain, example_inputs=example_inputs, forward_fn=forward,
            customized_pruners={t: pruner for t in pad_types}, verbose=False)
    out_fns = {t.grad_fn for t in tp.utils.flatten_as_list(outputs[-1]) if isinstance(t, torch.Tensor)}
    for mod, node in dg.module2node.items():
        if isinstance(mod, pad_types) and mod in shapes:
            n_in = shapes[mod][0]
            for src in node.inputs:
                for dep in node.dependencies:
                    if dep.target is src:
                        dep.index_mapping[0] = _Offset(mod.pad_lo, n_in, reverse=True)
                for dep in src.dependencies:
                    if dep.target is node:
                        dep.index_mapping[0] = _Offset(mod.pad_lo, n_in, reverse=False)
    names = {m: n for n, m in plain.named_modules()}
    # a layer whose output is the model's output (the classifier): its channels stay
    at_output = {names[m] for m, node in dg.module2node.items() if isinstance(m, nn.Module) and m in names
                 and node.grad_fn in out_fns}
    return dg, names, {names[m]: c[0] for m, c in shapes.items()}, at_output


def _classify(dg, module, handler, name: str) -> Tuple[Optional[str], Optional[int], Optional[str]]:
    """(kind, weight dim, reason) of one dependency target; kind None: a parameter-free op."""
    from torch_pruning import ops as tops

    if isinstance(module, _pad_types()):
        return "pad", 1, None
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:
            if module.groups == module.in_channels == module.out_channels:  # depthwise: in = out
                return "out", 1 if module.transposed else 0, None
            return "out", 0, f"grouped convolution {name!r} (groups={module.groups}) is kept whole"
        out = dg.is_out_channel_pruning_fn(handler)
        return ("out" if out else "in"), (0 if out != module.transposed else 1), None
    if isinstance(module, nn.Linear):
        out = dg.is_out_channel_pruning_fn(handler)
        return ("out" if out else "in"), (0 if out else 1), None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.affine:
            return "norm", 0, f"BatchNorm {name!r} has no affine scale and shift to mask"
        return "norm", 0, None
    if isinstance(module, tops._OutputOp):
        return None, None, "its channels reach the model's output"
    whole = [getattr(tops.OPTYPE, t) for t in ("LN", "GN", "IN", "PRELU", "EMBED", "MHA", "LSTM", "PARAMETER")
             if hasattr(tops.OPTYPE, t)]
    if isinstance(module, (nn.Module, nn.Parameter)) and tops.module2type(module) in whole:
        what = type(module).__name__ if isinstance(module, nn.Module) else "parameter"
        return None, None, f"{what} {name!r} cannot mask single channels exactly"
    return None, None, None


def _discover(plain: nn.Module, example_inputs) -> ChannelGroups:
    """Union-find over the (layer, kind, index) slices of Torch-Pruning's per-layer groups."""
    dg, names, pad_inputs, at_output = _build_graph(plain, example_inputs)
    order = {n: i for i, (n, _) in enumerate(plain.named_modules())}
    parent: Dict[tuple, tuple] = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    dims: Dict[Tuple[str, str], int] = {}
    reasons: Dict[tuple, str] = {}
    for module, node in list(dg.module2node.items()):
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(module)
        n_out = pruner.get_out_channels(module) if pruner is not None else None
        if not n_out:
            continue
        root = names[module]
        group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(n_out)))
        for item in group.items:
            tgt = item.dep.target.module
            tname = names.get(tgt, "?") if isinstance(tgt, nn.Module) else "?"
            kind, dim, reason = _classify(dg, tgt, item.dep.handler, tname)
            if tname in at_output and kind in ("out", "norm", "pad"):
                reason = reason or f"the output of {tname!r} is the model's output"
            for idx, r in zip(item.idxs, item.root_idxs):
                anchor = (order[root], root, "out", int(r))
                find(anchor)
                if reason is not None:
                    reasons.setdefault(anchor, reason)
                if kind is not None:
                    dims[(tname, kind)] = dim
                    union(anchor, (order[tname], tname, kind, int(idx)))
    # Channels: classes of slices. Groups: channels linked by a layer that produces them.
    chans: Dict[tuple, List[tuple]] = {}
    for a in list(parent):
        chans.setdefault(find(a), []).append(a)
    link: Dict[tuple, tuple] = {}
    gparent = {c: c for c in chans}

    def gfind(c):
        while gparent[c] != c:
            gparent[c] = gparent[gparent[c]]
            c = gparent[c]
        return c

    for c, elems in chans.items():
        for e in elems:
            if e[2] in ("out", "norm", "pad"):
                key = (e[1], e[2])
                if key in link:
                    a, b = gfind(link[key]), gfind(c)
                    if a != b:
                        gparent[max(a, b)] = min(a, b)
                else:
                    link[key] = c
    by_group: Dict[tuple, List[tuple]] = {}
    for c in chans:
        by_group.setdefault(gfind(c), []).append(c)
    groups = []
    for g in sorted(by_group):
        cs = sorted(by_group[g])  # a channel's key is its first slice: layer order, then index
        members: Dict[Tuple[str, str], Tuple[List[int], List[int]]] = {}
        reason = None
        for j, c in enumerate(cs):
            for e in sorted(chans[c]):
                reason = reason or reasons.get(e)
                idx, ch = members.setdefault((e[1], e[2]), ([], []))
                idx.append(e[3])
                ch.append(j)
        mem = tuple(Member(name, kind, dims[(name, kind)], torch.tensor(idx, dtype=torch.int64),
                           torch.tensor(ch, dtype=torch.int64))
                    for (name, kind), (idx, ch) in sorted(members.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])))
        groups.append(ChannelGroup(len(cs), mem, reason))
    return ChannelGroups(groups, pad_inputs)


def find_groups(model: nn.Module, example_inputs) -> ChannelGroups:
    """The coupled channel groups of ``model`` (plain or masked), traced on ``example_inputs``
    (a tensor, a tuple of positional inputs or a dict of keyword inputs). The model is not
    changed: a plain copy is traced (in eval mode)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return _discover(_plain_copy(model), example_inputs)


def attach_groups(model: nn.Module, example_inputs) -> ChannelGroups:
    """:func:`find_groups`, cached on ``model`` for ``structure="group"``; the BatchNorm layers of
    prunable groups become channel-masked in place (same parameters, buffers and state-dict keys
    plus ``channel_mask``). Call it once, before constructing the algorithm; returns the groups."""
    from ..nn.norm import mask_norms

    groups = find_groups(model, example_inputs)
    mask_norms(model, [m.name for g in groups if g.prunable for m in g.members if m.kind == "norm"])
    object.__setattr__(model, GROUPS_ATTR, groups)
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


def _slice_sq_norms(s: torch.Tensor, dim: int) -> torch.Tensor:
    s = s.detach().to(torch.float32)
    return s.transpose(0, dim).reshape(s.shape[dim], -1).pow(2).sum(dim=1)


def project_groups(model: nn.Module, names: Sequence[str], scores: Sequence[torch.Tensor], density: float,
                   backend: Optional[str] = None):
    """Group-structure masks: ``(weight masks, one per name; {name: bool vector})``, the vectors
    being the bias masks of removed filters and the channel masks of BatchNorm layers.

    ``names`` / ``scores``: the masked modules of ``model`` and their scores, in the same order."""
    groups = groups_of(model)
    pos = {n: i for i, n in enumerate(names)}
    masks = [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    vectors: Dict[str, torch.Tensor] = {}
    if not scores:
        return masks, vectors
    dev = scores[0].device
    skipped = []
    for g, mems in zip(groups.groups, _on_device(groups, dev)):
        if not g.prunable:
            continue
        unmasked = [m.name for m, _, _ in mems if m.kind in ("out", "in") and m.name not in pos]
        if unmasked:
            skipped.append(unmasked[0])
            continue
        norms = torch.zeros(g.channels, dtype=torch.float32, device=dev)
        for m, idx, ch in mems:
            if m.kind in ("out", "in"):
                norms.index_add_(0, ch, _slice_sq_norms(scores[pos[m.name]], m.dim)[idx])
        keep = ops.topk_masks([norms.sqrt()], max(1, keep_count(g.channels, density)), backend=backend)[0]
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
    if skipped and not groups._warned:
        groups._warned = True
        warnings.warn(f"structure='group': {len(skipped)} channel group(s) hold a conv / linear layer that is not "
                      f"masked (e.g. {skipped[0]!r}) and are kept whole", UserWarning, stacklevel=3)
    return masks, vectors


def apply_group_vectors(model: nn.Module, vectors: Dict[str, torch.Tensor]) -> None:
    """Copy the bias masks and BatchNorm channel masks of :func:`project_groups` into the model."""
    from ..nn.norm import MASKED_NORM_TYPES

    for name, vec in vectors.items():
        mod = model.get_submodule(name)
        if isinstance(mod, MASKED_NORM_TYPES):
            mod.set_channel_mask(vec)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"model: BatchNorm {name!r} of a channel group is not channel-masked; call "
                             f"bip_fast.attach_groups(model, example_inputs) on this model")
        elif getattr(mod, "bias", None) is not None:
            mod.set_bias_mask(vec)
