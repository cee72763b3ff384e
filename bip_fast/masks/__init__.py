"""Projection of scores onto a sparsity constraint (SPEC §2), for every structure.

All structures share one selection machinery, :func:`bip_fast.ops.topk_masks` (multi-tensor radix
select with the (tensor, flat index) tie rule): global runs it once over all layers, layer-wise once
per layer, filter/channel-wise on each layer's vector of L2 (or L1) norms, N:M on |s| grouped by M.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

from .. import ops
from ..files.checkpoint import load, save_atomic
from ..nn import masked_modules
from ..nn.convert import mask_norms
from ..nn.norm import MASKED_NORM_OF, MASKED_NORM_TYPES
from ..ops import keep_count
from .groups import ChannelGroups, attach_groups, find_groups

STRUCTURES = ("global", "layer", "filter", "channel", "nm", "group")
FILTER_NORMS = ("l2", "l1")  # how a filter / channel / group channel scores: the norm of its entries

__all__ = ["STRUCTURES", "FILTER_NORMS", "project", "apply_masks", "keep_count", "kept_units", "density_of", "save_masks",
           "load_masks", "find_groups", "attach_groups", "ChannelGroups"]


def kept_units(mask: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Which slices of ``mask`` along ``dim`` hold a nonzero entry, as a bool vector of length
    ``mask.shape[dim]``: the output filters (dim 0) or input channels (dim 1) that a mask keeps, a
    filter counting as kept while any of its entries is. A 1-d mask is one unit per entry."""
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0:
        raise ValueError(f"mask: expected a tensor of >= 1 dims, got {getattr(mask, 'shape', type(mask).__name__)}")
    m = mask.detach()
    return m.transpose(0, dim).reshape(m.shape[dim], -1).ne(0).any(dim=1)


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density: expected a float, got {type(density).__name__}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density: expected a value in (0, 1] (sparsity in [0, 1)), got {density}")
    return float(density)


def project(
    scores: Sequence[torch.Tensor],
    density: float,
    structure: str = "global",
    *,
    n: int = 2,
    m: int = 4,
    backend: Optional[str] = None,
    out_dims: Optional[Sequence[int]] = None,
    filter_norm: str = "l2",
    within: Optional[Sequence[torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """Bool masks keeping a fraction ``density`` of the weights under ``structure``.

    Filter- and channel-wise structures keep at least one filter / input channel per layer (a
    layer with none would disconnect the network), so at very high sparsity they keep slightly
    more than ``density``. ``out_dims``: per tensor, the dimension of the output channels (0 for
    conv and linear weights, the default; 1 for transposed convolutions, whose weight is
    (in, out / groups, *kernel)); filters are slices along it, channels along the other of 0, 1.

    ``filter_norm`` (filter / channel): a slice's score is the L2 norm of its entries (``"l2"``,
    SPEC §2) or their L1 norm (``"l1"``, the L1-norm filter pruning of Li et al. 2017).
    ``within`` (filter / channel): the current masks, one per tensor; only the slices that still
    hold a kept entry compete, each layer keeps ``max(1, round(density · remaining))`` of them, and
    the result keeps nothing outside ``within`` (iterative pruning: pruned filters stay pruned).
    """
    density = _check_density(density)
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
    if filter_norm not in FILTER_NORMS:
        raise ValueError(f"filter_norm: expected one of {FILTER_NORMS}, got {filter_norm!r}")
    if within is not None and structure not in ("filter", "channel"):
        raise ValueError(f"within: supported by the filter and channel structures, got structure={structure!r}")
    if structure == "group":
        raise ValueError("structure: 'group' projects a model's coupled channels, not a list of scores; "
                         "see bip_fast.masks.groups.project_groups")
    scores = list(scores)
    if structure == "global":
        total = sum(s.numel() for s in scores)
        return ops.topk_masks(scores, keep_count(total, density), backend=backend)
    if structure == "layer":
        return [ops.topk_masks([s], keep_count(s.numel(), density), backend=backend)[0] for s in scores]
    if structure in ("filter", "channel"):
        out_dims = [0] * len(scores) if out_dims is None else list(out_dims)
        if len(out_dims) != len(scores) or any(d not in (0, 1) for d in out_dims):
            raise ValueError(f"out_dims: expected one 0 or 1 per scores tensor ({len(scores)}), got {out_dims}")
        if within is not None:
            within = list(within)
            if len(within) != len(scores) or any(w.shape != s.shape for w, s in zip(within, scores)):
                raise ValueError(f"within: expected one mask per scores tensor, of its shape "
                                 f"({[tuple(s.shape) for s in scores]}), got {[tuple(w.shape) for w in within]}")
        out = []
        for i, s in enumerate(scores):
            if s.dim() < 2:
                raise ValueError(f"scores[{i}]: {structure}-wise pruning needs a weight of >= 2 dims, got {tuple(s.shape)}")
            dim = out_dims[i] if structure == "filter" else 1 - out_dims[i]
            rows = s.detach().to(torch.float32).transpose(0, dim).reshape(s.shape[dim], -1)
            norms = rows.norm(dim=1) if filter_norm == "l2" else rows.abs().sum(dim=1)
            shape = [1] * s.dim()
            shape[dim] = -1
            if within is None:
                # at least one filter/channel per layer: an empty layer cuts the network in two
                keep = ops.topk_masks([norms], max(1, keep_count(norms.numel(), density)), backend=backend)[0]
                out.append(keep.view(shape).expand(s.shape).contiguous())
                continue
            alive = kept_units(within[i], dim)
            keep = torch.zeros_like(alive)
            cand = norms[alive]
            if cand.numel() > 0:
                keep[alive] = ops.topk_masks([cand], max(1, keep_count(cand.numel(), density)), backend=backend)[0]
            out.append(keep.view(shape).expand(s.shape) & within[i])
        return out
    return [_nm_mask(s, n, m, i) for i, s in enumerate(scores)]


def _nm_mask(s: torch.Tensor, n: int, m: int, i: int) -> torch.Tensor:
    """Keep the n largest |s| in each group of m consecutive weights along the input dimension.

    The input dimension of a conv weight (O, I, kh, kw) is its flattened (I, kh, kw) axis, the K
    axis of the implicit GEMM. Ties go to the lower index, as everywhere.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"n/m: expected integers with 0 < n <= m, got {n}/{m}")
    k = s[0].numel() if s.dim() > 1 else s.numel()
    if k % m != 0:
        raise ValueError(f"scores[{i}]: input dimension {k} of a weight of shape {tuple(s.shape)} is not a "
                         f"multiple of m={m} for {n}:{m} pruning (exclude that layer, or use another structure)")
    a = s.detach().to(torch.float32).abs().reshape(-1, m)
    order = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(a, dtype=torch.bool).scatter_(1, order, True)
    return mask.view(s.shape)


def apply_masks(modules: Iterable[torch.nn.Module], masks: Sequence[torch.Tensor]) -> None:
    """Copy ``masks`` into the modules' mask buffers in place (compiled graphs stay valid)."""
    modules = list(modules)
    if len(modules) != len(masks):
        raise ValueError(f"masks: expected {len(modules)} masks (one per masked module), got {len(masks)}")
    for mod, mk in zip(modules, masks):
        mod.set_mask(mk)


def density_of(masks: Sequence[torch.Tensor]) -> float:
    total = sum(mk.numel() for mk in masks)
    return float(sum(int(mk.sum()) for mk in masks)) / max(total, 1)


MASKS_FORMAT = "bip_fast.masks/2"
_WEIGHT_ONLY_FORMAT = "bip_fast.masks/1"  # older files: the weight masks alone


def save_masks(model: torch.nn.Module, path) -> None:
    """Save every mask of a masked model (atomic, checksummed write): ``masks`` {masked layer:
    bool weight mask}, ``bias_masks`` {layer: bool vector of its bias} and ``channel_masks``
    {channel-masked BatchNorm layer: bool vector}; the last two are what ``structure="group"``
    sets on a removed channel's biases and BatchNorm scale and shift."""
    save_atomic({"format": MASKS_FORMAT,
                 "masks": {n: mod.mask.cpu() for n, mod in masked_modules(model)},
                 "bias_masks": {n: mod.bias_mask.cpu() for n, mod in masked_modules(model)
                                if "bias_mask" in mod._buffers},
                 "channel_masks": {n: mod.channel_mask.cpu() for n, mod in model.named_modules()
                                   if isinstance(mod, MASKED_NORM_TYPES)}}, path)


def load_masks(model: torch.nn.Module, path) -> torch.nn.Module:
    """Put the masks of a :func:`save_masks` file onto ``model`` and return it: weight masks into
    its masked layers, bias masks into their biases, channel masks into its BatchNorm layers (a
    plain BatchNorm named in the file becomes channel-masked in place, as attach_groups makes it).

    ``model``: the architecture sparsified as the run was (``bip_fast.sparsify(model)``, with the
    run's include / exclude), holding the weights to mask; load the weights first, as loading a
    plain state dict resets a masked layer's mask. Everything is checked before anything changes: the file's layers must be the model's
    (each weight mask named, of the weight's shape; no bias or channel mask of the model left out),
    else ValueError naming the mismatch. A file of the older weight-only format restores weight
    masks only."""
    obj = load(path)
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in (MASKS_FORMAT, _WEIGHT_ONLY_FORMAT):
        raise ValueError(f"path: {path} is not a bip_fast mask file")
    mods = dict(masked_modules(model))
    weights = _matched(path, "weight masks", obj.get("masks"), {n: m.mask.shape for n, m in mods.items()})
    if fmt == _WEIGHT_ONLY_FORMAT:
        biases, channels = {}, {}
    else:
        have_bias = {n: m.bias.shape for n, m in mods.items() if getattr(m, "bias", None) is not None}
        biases = _matched(path, "bias masks", obj.get("bias_masks"), have_bias,
                          required={n for n, m in mods.items() if "bias_mask" in m._buffers})
        norms = {n: torch.Size([m.num_features]) for n, m in model.named_modules()
                 if isinstance(m, MASKED_NORM_TYPES) or type(m) in MASKED_NORM_OF}
        channels = _matched(path, "channel masks", obj.get("channel_masks"), norms,
                            required={n for n, m in model.named_modules() if isinstance(m, MASKED_NORM_TYPES)})
    for name, mk in weights.items():
        mods[name].set_mask(mk)
    for name, mk in biases.items():
        mods[name].set_bias_mask(mk)
    model = mask_norms(model, list(channels))
    for name, mk in channels.items():
        model.get_submodule(name).set_channel_mask(mk)
    return model


def _matched(path, what: str, saved, shapes: dict, required=None) -> dict:
    """``saved`` {layer: bool tensor}, checked against the model's ``shapes`` {layer: shape}: each
    saved layer one of them, of its shape; ``required`` (default: all of them) present."""
    if not isinstance(saved, dict):
        raise ValueError(f"path: {path} is not a bip_fast mask file ({what}: not a dict)")
    required = set(shapes) if required is None else required
    missing, extra = sorted(required - set(saved)), sorted(set(saved) - set(shapes))
    if missing or extra:
        raise ValueError(f"path: the {what} of {path} do not match the model: missing {_few(missing)}, "
                         f"unexpected {_few(extra)}; sparsify the architecture as the run did: "
                         f"bip_fast.sparsify(model, include=..., exclude=...) with the run's --include/--exclude")
    for name, mk in saved.items():
        if not isinstance(mk, torch.Tensor) or mk.dtype != torch.bool or mk.shape != shapes[name]:
            raise ValueError(f"path: {what}[{name!r}] of {path}: expected a bool tensor of shape "
                             f"{tuple(shapes[name])}, got {getattr(mk, 'dtype', type(mk).__name__)} "
                             f"{tuple(getattr(mk, 'shape', ()))}")
    return saved


def _few(names: List[str]) -> str:
    return str(names[:4])[:-1] + f", ... {len(names) - 4} more]" if len(names) > 4 else str(names)
