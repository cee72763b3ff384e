"""Shared pieces of the group-structure and compaction tests: models with non-trivial BatchNorm
statistics, and parameter / MAC counts derived from masks (masked model) or shapes (compacted)."""
from __future__ import annotations

import math

import torch
from torch import nn

import bip_fast
from bip_fast.nn import MASKED_NORM_TYPES, masked_modules


@torch.no_grad()
def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Scales, shifts and running statistics away from their init, so a BatchNorm shift that
    leaks through a removed channel shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_mean.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _any_along(mask: torch.Tensor, dim: int) -> int:
    return int(mask.transpose(0, dim).reshape(mask.shape[dim], -1).any(dim=1).sum())


def kept_shapes(model: nn.Module):
    """{name: (kept out, kept in per group)} of every masked conv / linear, from its mask."""
    out = {}
    for name, m in masked_modules(model):
        od = getattr(m, "out_dim", 0)
        k_out = _any_along(m.mask, od)
        k_in = _any_along(m.mask, 1 - od) if getattr(m, "groups", 1) == 1 else 1
        out[name] = (k_out, k_in)
    return out


def expected_params(model: nn.Module) -> int:
    """Parameters of the compacted model, counted from the masked model's masks."""
    shapes = kept_shapes(model)
    total = 0
    for name, m in model.named_modules():
        if name in shapes:
            k_out, k_in = shapes[name]
            kernel = math.prod(m.weight.shape[2:]) if m.weight.dim() > 2 else 1
            total += k_out * k_in * kernel + (k_out if m.bias is not None else 0)
        elif isinstance(m, MASKED_NORM_TYPES):
            total += 2 * int(m.channel_mask.sum())
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            total += 2 * m.num_features
        elif not list(m.children()):
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def plain_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))


def _spatial(model: nn.Module, x) -> dict:
    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: sizes.__setitem__(name, o[0].numel() // o.shape[1])))
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    for h in hooks:
        h.remove()
    return sizes


def expected_macs(model: nn.Module, x) -> int:
    """Multiply-accumulates per sample of the compacted model's convs and linears, from the masks."""
    sizes = _spatial(model, x)
    total = 0
    for name, (k_out, k_in) in kept_shapes(model).items():
        m = model.get_submodule(name)
        kernel = math.prod(m.weight.shape[2:]) if m.weight.dim() > 2 else 1
        total += sizes[name] * k_out * k_in * kernel
    return total


def bip_fast_modules(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("bip_fast.nn")]


def group_keep(model: nn.Module, groups) -> list:
    """Per prunable group: the kept channels (bool), checking that every member agrees."""
    masked = dict(masked_modules(model))
    out = []
    for g in groups:
        if not g.prunable:
            continue
        keep = None
        for mem in g.members:
            if mem.kind == "pad":
                continue
            mod = model.get_submodule(mem.name)
            if mem.kind == "norm":
                vec = mod.channel_mask[mem.index]
            else:
                mk = masked[mem.name].mask
                sl = mk.transpose(0, mem.dim).reshape(mk.shape[mem.dim], -1)[mem.index]
                vec = sl.any(dim=1)
                if mem.kind == "out" and getattr(mod, "bias", None) is not None:
                    assert torch.equal(mod.bias_mask[mem.index], vec), mem.name
            if keep is None:
                keep = torch.full((g.channels,), -1, dtype=torch.int64)
            seen = keep[mem.channel]
            mine = vec.cpu().long()
            assert bool(((seen < 0) | (seen == mine)).all()), f"{mem.name}: disagrees with the group's other members"
            keep[mem.channel] = mine
        assert bool((keep >= 0).all())
        out.append((g, keep.bool()))
    return out


def tv(name: str, **kw) -> nn.Module:
    import pytest

    torchvision = pytest.importorskip("torchvision")
    return getattr(torchvision.models, name)(weights=None, **kw)


__all__ = ["randomise_norms", "expected_params", "expected_macs", "plain_params", "bip_fast_modules",
           "group_keep", "tv", "bip_fast"]
