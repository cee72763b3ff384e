"""Tracing the coupled channel groups of a model: Torch-Pruning's dependency graph, merged.

:func:`discover_groups` traces a plain model once with Torch-Pruning's dependency graph and returns
its couplings as :class:`ChannelGroups`; a channel of a group is the set of weight slices (filters,
input slices, BatchNorm entries) that live or die together. :mod:`bip_fast.masks.groups` caches them
on a model for ``structure="group"``; :func:`bip_fast.compact` traces them again to cut channels out.

Couplings come from Torch-Pruning's per-layer groups, merged where they share a slice (union-find),
so a channel padding shortcut (the CIFAR ResNets' option A, :class:`bip_fast.models.ShortcutA`)
couples a stage's channels with the matching channels of the next stage. A group is kept whole
(``reason`` says why) when it reaches the model's output, holds a grouped (not depthwise)
convolution, a BatchNorm without affine parameters, or a layer whose channels cannot be masked
exactly (LayerNorm, GroupNorm, PReLU, attention, embeddings, bare parameters).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..models import ShortcutA
from ..nn import finalize

__all__ = ["Member", "ChannelGroup", "ChannelGroups", "call_model", "plain_copy", "discover_groups"]

# layers that pad channels (input channel j is output channel j + pad_lo)
_PAD_TYPES = (ShortcutA,)


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


def output_tensors(out) -> List[torch.Tensor]:
    """The tensors of a model output (a tensor, tuples / lists and dicts of them, nested), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def hooked_pass(model: nn.Module, example_inputs, hooks) -> None:
    """One eval-mode forward of ``example_inputs`` with ``hooks`` (handles of registered hooks),
    which are removed afterwards, and the model's training mode restored, whatever happens."""
    was = model.training
    model.eval()
    try:
        call_model(model, example_inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with plain layers (masks baked in) and every parameter requiring grad: the
    dependency graph is traced through autograd."""
    plain = finalize(copy.deepcopy(model))
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


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

    pad_types = _PAD_TYPES
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

    if isinstance(module, _PAD_TYPES):
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


def discover_groups(plain: nn.Module, example_inputs) -> ChannelGroups:
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
