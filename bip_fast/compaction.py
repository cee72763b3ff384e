"""Physical compaction: the channels a structured mask removed, cut out of the network.

:func:`compact` returns a plain PyTorch model (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ... and the
model's own container classes; no bip_fast layer inside) that computes what the masked model
computes, with fewer channels. It traces the coupled channel groups of the model
(:mod:`bip_fast.masks.group_trace`) and removes a channel of a group when every layer that produces
it outputs exactly 0 there: its filter and bias are zero and its BatchNorm scale and shift are
zero, which is what ``structure="group"`` masks give. The layer surgery is Torch-Pruning's pruning
functions (conv / depthwise conv / linear / BatchNorm, output and input side); a channel-padding
shortcut gets new pads. Every group keeps at least one channel. Channels of other structures
(unstructured, N:M, the per-layer filter masks, whose BatchNorm shift still flows) stay, with
their zeros baked in, as :func:`bip_fast.finalize` writes them.

Before returning, the masked and the compacted model run on ``example_inputs`` in eval mode and
must agree within ``rtol`` × the largest output magnitude (1e-4 by default, for float32 models),
else ValueError: an operation between coupled layers that does not map 0 to 0 (a sigmoid gate, an
added constant) makes a zero channel non-removable.
"""

from __future__ import annotations

import io
from typing import Dict, List, Tuple

import torch
from torch import nn

from .files.checkpoint import _check_path, _write_atomic
from .masks.group_trace import Member, call_model, discover_groups, plain_copy

__all__ = ["compact", "export_compact", "count_macs"]


def _producer_zero(mod: nn.Module, mem: Member) -> torch.Tensor:
    """Per member index: whether the layer outputs exactly 0 on that channel."""
    w = mod.weight.detach()
    zero = w.transpose(0, mem.dim).reshape(w.shape[mem.dim], -1).eq(0).all(dim=1)
    if getattr(mod, "bias", None) is not None:
        zero &= mod.bias.detach().eq(0)
    return zero[mem.index.to(zero.device)].cpu()


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


def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, example_inputs) -> Tuple[float, float]:
    modes = (a.training, b.training)
    a.eval()
    b.eval()
    try:
        ra, rb = _outputs(call_model(a, example_inputs)), _outputs(call_model(b, example_inputs))
    finally:
        a.train(modes[0])
        b.train(modes[1])
    if len(ra) != len(rb) or any(x.shape != y.shape for x, y in zip(ra, rb)):
        raise ValueError("compact: the compacted model's outputs have other shapes than the masked model's")
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(ra, rb) if x.numel()), default=0.0)
    scale = max((float(x.double().abs().max()) for x in ra if x.numel()), default=0.0)
    return diff, scale


def compact(model: nn.Module, example_inputs, *, check: bool = True, rtol: float = 1e-4) -> nn.Module:
    """A plain copy of ``model`` with the removed channels physically gone (``model`` is unchanged).

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs, on the
    model's device; it traces the channel couplings and (``check``) compares the two models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    plain = plain_copy(model)
    groups = discover_groups(plain, example_inputs)
    removals: List[Tuple[nn.Module, Member, List[int]]] = []
    for g in groups:
        if not g.prunable:
            continue
        alive = torch.zeros(g.channels, dtype=torch.bool)
        producers = [m for m in g.members if m.kind in ("out", "norm")]
        if not producers:
            continue
        for mem in producers:
            alive[mem.channel[~_producer_zero(plain.get_submodule(mem.name), mem)]] = True
        if not alive.any():
            alive[0] = True  # keep one channel: an empty layer cuts the network in two
        for mem in g.members:
            gone = mem.index[~alive[mem.channel]].tolist()
            if gone:
                removals.append((plain.get_submodule(mem.name), mem, gone))
    for mod, mem, idxs in removals:
        _remove(mod, mem, idxs, groups.pad_inputs)
    for n, p in plain.named_parameters():
        p.requires_grad_(requires.get(n, True))
    plain.train(model.training)
    if check:
        diff, scale = _max_diff(model, plain, example_inputs)
        if diff > rtol * scale + 1e-12:
            raise ValueError(f"compact: the compacted model differs from the masked one by {diff:.3g} (output scale "
                             f"{scale:.3g}, rtol {rtol}); an operation between coupled layers does not map a zero "
                             f"channel to zero")
    return plain


def export_compact(model: nn.Module, example_inputs, path, *, check: bool = True) -> Dict[str, object]:
    """:func:`compact` ``model`` and write it with ``torch.export`` (a ``.pt2`` file: graph and
    weights, the batch dimension dynamic), which loads without bip_fast::

        small = torch.export.load(path).module()

    ``example_inputs``: a tensor, or a tuple of tensors, with a batch dimension of at least 2
    (torch.export specialises a size-1 dimension). Returns the file and the parameter counts."""
    small = compact(model, example_inputs, check=check).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    program = torch.export.export(small, args, dynamic_shapes=dynamic)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    _write_atomic((buf.getbuffer(),), _check_path(path))  # temporary file, fsync, rename
    return {"path": str(path), "params": sum(p.numel() for p in small.parameters()),
            "masked_params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))}


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

    hooks = [m.register_forward_hook(add) for m in model.modules()  # a counting pass, not training
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(m, "transposed", False)]
    was = model.training
    model.eval()
    try:
        call_model(model, example_inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return total[0]
