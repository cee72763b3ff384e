"""Physical compaction: the channels a structured mask removed, cut out of the network.

:func:`compact` returns a plain PyTorch model (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ... and the
model's own container classes; no bip_fast layer inside) that computes what the masked model
computes in eval mode, with fewer channels. It traces the coupled channel groups of the model
(:mod:`bip_fast.masks.group_trace`): a channel of a group is the filter of every layer producing
it, its BatchNorm entries and the input slices of every layer reading it; they live or die together.

A channel is removed when

1. every conv / linear layer producing it has a zero filter there (weights only: a bias or a
   BatchNorm after it makes the channel a constant, but one that does not depend on the input), and
2. every layer reading it receives exactly 0 there, measured in one eval-mode forward of
   ``example_inputs``; by 1 the value is the same for every input.

Group masks (``structure="group"``) zero the filters and the BatchNorm scale and shift of a
channel, so 2 follows. Per-layer filter masks (``structure="filter"``) zero filters only: a filter
whose BatchNorm leaves a constant c goes when a ReLU between maps c to 0 (c <= 0) and stays as
zeros when c > 0; a filter zeroed in one branch of a residual addition stays when the other branch
still produces that channel (1 fails); a constant that reaches a layer is never folded into its
bias (a zero-padded convolution would see it differently at the border). An operation that does
not map 0 to 0 (a sigmoid gate, an added constant) keeps the channel by 2. Every group keeps at
least one channel. With ``return_report=True`` :func:`compact` also returns a
:class:`CompactReport`: channels and filters removed, left as zeros, and why they stay.

The layer surgery is Torch-Pruning's pruning functions (conv / depthwise conv / linear / BatchNorm,
output and input side); a channel-padding shortcut gets new pads. Zeros of other structures
(unstructured, N:M) stay, baked in as :func:`bip_fast.finalize` writes them.

Before returning, the masked and the compacted model run on ``example_inputs`` in eval mode and
must agree within ``rtol`` × the largest output magnitude (1e-4 by default, for float32 models),
else ValueError.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .files.checkpoint import _check_path, _write_atomic
from .masks import kept_units
from .masks.group_trace import ChannelGroups, Member, call_model, discover_groups, hooked_pass, output_tensors, plain_copy

__all__ = ["compact", "CompactReport", "export_compact", "count_macs"]

# why a channel with a zero filter stays (CompactReport.kept_because keys)
LIVE = "another layer still produces the channel"
REACHES = "a non-zero value reaches a layer that reads the channel"
LAST = "the group's last channel"
WHOLE = "the group is kept whole"


@dataclass(frozen=True)
class CompactReport:
    """What :func:`compact` did with the zeros it found.

    A *channel* is one channel of a coupled group (one slice of each member layer); a *filter* is
    one output slice of one conv / linear layer. ``channels_removed`` / ``filters_removed``: cut
    out. ``channels_zero``: channels kept although a layer producing them has a zero filter;
    ``filters_zero``: the zero filters left in place. ``kept_because``: {reason: channels} for
    ``channels_zero``. ``layers``: {layer: {"filters", "removed", "zero"}} of every conv / linear
    layer that produces channels of a group."""

    channels: int
    channels_removed: int
    channels_zero: int
    filters: int
    filters_removed: int
    filters_zero: int
    kept_because: Dict[str, int] = field(default_factory=dict)
    layers: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _filter_zero(mod: nn.Module, mem: Member) -> torch.Tensor:
    """Per member index: whether the layer's filter (weights, not bias) is all zero there."""
    w = mod.weight.detach()
    zero = w.transpose(0, mem.dim).reshape(w.shape[mem.dim], -1).eq(0).all(dim=1)
    return zero[mem.index.to(zero.device)].cpu()


@torch.no_grad()
def _reaching(plain: nn.Module, groups: ChannelGroups, example_inputs) -> Dict[str, torch.Tensor]:
    """{layer: bool per input channel (conv) or feature (linear)}: whether a non-zero value
    arrives there in an eval-mode forward of ``example_inputs``. Measured on the traced copy
    (a tracing-time hook, removed before it returns); a layer that never runs is not listed."""
    seen: Dict[str, torch.Tensor] = {}

    def record(name: str, linear: bool):
        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                return
            d = x.dim() - 1 if linear else min(1, x.dim() - 1)
            nz = kept_units(x, d).cpu()
            seen[name] = nz | seen[name] if name in seen and seen[name].shape == nz.shape else nz
        return hook

    readers = sorted({m.name for g in groups for m in g.members if m.kind == "in"})
    hooked_pass(plain, example_inputs,
                [plain.get_submodule(n).register_forward_pre_hook(record(n, isinstance(plain.get_submodule(n), nn.Linear)))
                 for n in readers])
    return seen


def _remove(mod: nn.Module, mem: Member, idxs: List[int], pad_inputs: Dict[str, int]) -> None:
    from torch_pruning.pruner import function as F

    if mem.kind == "pad":
        n_in = pad_inputs[mem.name]
        lo = mod.pad_lo
        mod.pad_lo -= sum(1 for i in idxs if i < lo)
        mod.pad_hi -= sum(1 for i in idxs if i >= lo + n_in)
    elif mem.kind == "norm":
        F.prune_batchnorm_out_channels(mod, idxs)
    elif isinstance(mod, nn.Linear):
        (F.prune_linear_out_channels if mem.kind == "out" else F.prune_linear_in_channels)(mod, idxs)
    elif mod.groups > 1:  # depthwise (other grouped convolutions are never in a prunable group)
        F.prune_depthwise_conv_out_channels(mod, idxs)
    else:
        (F.prune_conv_out_channels if mem.kind == "out" else F.prune_conv_in_channels)(mod, idxs)


def _plan(plain: nn.Module, groups: ChannelGroups, reach: Dict[str, torch.Tensor]):
    """The removals [(module, member, indices)] and the report."""
    removals: List[Tuple[nn.Module, Member, List[int]]] = []
    why: Counter = Counter()
    layers: Dict[str, Dict[str, int]] = {}
    n_removed = n_zero = n_channels = 0
    for g in groups:
        n_channels += g.channels
        outs = [m for m in g.members if m.kind == "out"]
        produced = torch.zeros(g.channels, dtype=torch.bool)  # some layer makes the channel
        live = torch.zeros(g.channels, dtype=torch.bool)      # ... with a non-zero filter
        zero = torch.zeros(g.channels, dtype=torch.bool)      # ... with a zero filter
        zeros = []
        for mem in outs:
            z = _filter_zero(plain.get_submodule(mem.name), mem)
            zeros.append(z)
            produced[mem.channel] = True
            live[mem.channel[~z]] = True
            zero[mem.channel[z]] = True
        read = torch.zeros(g.channels, dtype=torch.bool)      # a reader receives a non-zero value
        for mem in g.members:
            if mem.kind == "in":
                got = reach.get(mem.name)
                read[mem.channel if got is None or got.numel() <= int(mem.index.max())
                     else mem.channel[got[mem.index]]] = True
        gone = produced & ~live & ~read if g.prunable else torch.zeros(g.channels, dtype=torch.bool)
        last = torch.zeros(g.channels, dtype=torch.bool)
        if gone.all():
            gone[0], last[0] = False, True  # keep one channel: an empty layer cuts the network in two
        kept = zero & ~gone
        n_removed += int(gone.sum())
        n_zero += int(kept.sum())
        if not g.prunable:
            why[f"{WHOLE} ({g.reason})"] += int(kept.sum())
        else:
            why[LIVE] += int((kept & live).sum())
            why[REACHES] += int((kept & ~live & read).sum())
            why[LAST] += int((kept & ~live & ~read & last).sum())
        for mem, z in zip(outs, zeros):
            cut = gone[mem.channel]
            row = layers.setdefault(mem.name, {"filters": 0, "removed": 0, "zero": 0})
            row["filters"] += len(mem.index)
            row["removed"] += int(cut.sum())
            row["zero"] += int((z & ~cut).sum())
        for mem in g.members:
            idxs = mem.index[gone[mem.channel]].tolist()
            if idxs:
                removals.append((plain.get_submodule(mem.name), mem, idxs))
    report = CompactReport(
        channels=n_channels, channels_removed=n_removed, channels_zero=n_zero,
        filters=sum(r["filters"] for r in layers.values()), filters_removed=sum(r["removed"] for r in layers.values()),
        filters_zero=sum(r["zero"] for r in layers.values()), kept_because={k: v for k, v in why.items() if v},
        layers=layers)
    return removals, report


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, example_inputs) -> Tuple[float, float]:
    modes = (a.training, b.training)
    a.eval()
    b.eval()
    try:
        ra, rb = output_tensors(call_model(a, example_inputs)), output_tensors(call_model(b, example_inputs))
    finally:
        a.train(modes[0])
        b.train(modes[1])
    if len(ra) != len(rb) or any(x.shape != y.shape for x, y in zip(ra, rb)):
        raise ValueError("compact: the compacted model's outputs have other shapes than the masked model's")
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(ra, rb) if x.numel()), default=0.0)
    scale = max((float(x.double().abs().max()) for x in ra if x.numel()), default=0.0)
    return diff, scale


def compact(model: nn.Module, example_inputs, *, check: bool = True, rtol: float = 1e-4,
            return_report: bool = False):
    """A plain copy of ``model`` with the removable channels physically gone (``model`` is
    unchanged); with ``return_report=True``, ``(copy, CompactReport)``.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs, on the
    model's device; it traces the channel couplings, shows which zero channels reach a layer and
    (``check``) compares the two models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    plain = plain_copy(model)
    groups = discover_groups(plain, example_inputs)
    removals, report = _plan(plain, groups, _reaching(plain, groups, example_inputs))
    for mod, mem, idxs in removals:
        _remove(mod, mem, idxs, groups.pad_inputs)
    for n, p in plain.named_parameters():
        p.requires_grad_(requires.get(n, True))
    plain.train(model.training)
    if check:
        diff, scale = _max_diff(model, plain, example_inputs)
        if diff > rtol * scale + 1e-12:
            raise ValueError(f"compact: the compacted model differs from the masked one by {diff:.3g} (output scale "
                             f"{scale:.3g}, rtol {rtol}); a removed channel was not zero where a layer reads it")
    return (plain, report) if return_report else plain


def export_compact(model: nn.Module, example_inputs, path, *, check: bool = True,
                   compacted: Optional[Tuple[nn.Module, "CompactReport"]] = None) -> Dict[str, object]:
    """:func:`compact` ``model`` and write it with ``torch.export`` (a ``.pt2`` file: graph and
    weights, the batch dimension dynamic), which loads without bip_fast::

        small = torch.export.load(path).module()

    ``example_inputs``: a tensor, or a tuple of tensors, with a batch dimension of at least 2
    (torch.export specialises a size-1 dimension). Returns the file, the parameter counts and the
    channel counts of :class:`CompactReport` (removed, left as zeros). ``compacted``: the
    ``(model, report)`` that ``compact(model, example_inputs, return_report=True)`` already made,
    written as it is instead of compacting again."""
    small, report = compacted if compacted is not None else compact(model, example_inputs, check=check,
                                                                    return_report=True)
    small.eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    program = torch.export.export(small, args, dynamic_shapes=dynamic)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    _write_atomic((buf.getbuffer(),), _check_path(path))  # temporary file, fsync, rename
    return {"path": str(path), "params": sum(p.numel() for p in small.parameters()),
            "masked_params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores")),
            "channels_removed": report.channels_removed, "channels_zero": report.channels_zero}


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of the conv and linear layers of one eval-mode forward on
    ``example_inputs``, from the layers' shapes (a masked layer counts as dense)."""
    total = [0]

    def add(mod, inputs, out):
        per_out = out.numel()
        if isinstance(mod, nn.Linear):
            total[0] += per_out * mod.in_features
        else:
            kernel = 1
            for k in mod.kernel_size:
                kernel *= k
            total[0] += per_out * (mod.in_channels // mod.groups) * kernel

    hooked_pass(model, example_inputs,  # a counting pass, not training
                [m.register_forward_hook(add) for m in model.modules()
                 if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(m, "transposed", False)])
    return total[0]
