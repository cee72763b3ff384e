"""sparsify / finalize / sparsity_report and parameter groups of masked models.

Nothing is left dense silently. :func:`sparsify` swaps exactly nn.Linear, nn.Conv1d/2d/3d,
nn.ConvTranspose1d/2d/3d (``MASKED_OF``) and nn.MultiheadAttention with a packed input projection;
every other weight-bearing layer (attention with separate q/k/v projections, Bilinear, lazy and
subclassed layers) is named in a warning, and so is a layer whose weight its
parent reads directly (``F.linear(x, self.qkv.weight)``, as torchvision's Swin attention does):
a masked module only masks what goes through its own forward, so such a layer is left dense
rather than shown as pruned. :func:`sparsity_report` lists all of them under ``skipped``. The
algorithms also check, after their first backward pass, that every masked weight got its
gradient through the mask (a dynamic use the source scan cannot see raises there).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .modules import MASKED_OF, MASKED_TYPES, PLAIN_OF, MaskedLinear, MaskedMultiheadAttention
from .norm import MASKED_NORM_OF, MASKED_NORM_TYPES, to_masked_norm

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _selector(sel: Selector, arg: str, names: List[str]) -> Optional[Callable[[str, nn.Module], bool]]:
    if sel is None:
        return None
    if callable(sel):
        return sel
    if not isinstance(sel, (str, Iterable)):
        raise TypeError(f"{arg}: expected a module name, a glob pattern, a list of them or a callable "
                        f"(name, module) -> bool, got {type(sel).__name__}")
    patterns = [sel] if isinstance(sel, str) else list(sel)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg}: expected module names or glob patterns (str), got {type(p).__name__}")
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"{arg}: {p!r} matches no maskable (conv / linear) module; candidates: {names}")
    return lambda name, _m: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _ctor_kwargs(m: nn.Module) -> Dict[str, object]:
    """The constructor arguments that rebuild ``m`` (plain or masked, same signature)."""
    if isinstance(m, nn.Linear):
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
    kw = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
              padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
              padding_mode=m.padding_mode)
    if m.transposed:
        kw["output_padding"] = m.output_padding
    return kw


def _maskable(m: nn.Module) -> bool:
    """Whether :func:`sparsify` swaps ``m`` (exact types: subclasses are left alone)."""
    return type(m) in MASKED_OF or type(m) is nn.MultiheadAttention and _mha_supported(m)


def _to_masked(m: nn.Module, cls: Optional[type] = None) -> nn.Module:
    """The masked version (``cls``, by default ``MASKED_OF[type(m)]``) of ``m``."""
    dev, dt = m.weight.device, m.weight.dtype
    new = (cls or MASKED_OF[type(m)])(**_ctor_kwargs(m), device="meta", dtype=dt)
    # Keep the very same Parameter objects, so optimisers holding them stay valid.
    new.weight = m.weight
    new.bias = m.bias
    new.scores = nn.Parameter(m.weight.detach().to(torch.float32).clone())
    new.mask = torch.ones(m.weight.shape, dtype=torch.bool, device=dev)
    if m.weight.dim() == 4 and m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous():
        new.scores.data = new.scores.data.contiguous(memory_format=torch.channels_last)
        new.mask = new.mask.contiguous(memory_format=torch.channels_last)
    new.train(m.training)
    return new


# ----------------------------------------------------------------------------- attention

def _mha_supported(m: nn.MultiheadAttention) -> bool:
    """Whether ``m`` has the packed input projection this module masks."""
    return bool(m._qkv_same_embed_dim)


def _mha_ctor_kwargs(m: nn.MultiheadAttention) -> dict:
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, batch_first=m.batch_first)


def _mha_to_masked(m: nn.MultiheadAttention) -> MaskedMultiheadAttention:
    """The masked version of ``m``, keeping its very Parameter objects."""
    new = MaskedMultiheadAttention(**_mha_ctor_kwargs(m), device="meta", dtype=m.in_proj_weight.dtype)
    for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        setattr(new, name, getattr(m, name))
    new._init_masking()  # scores and mask from the real in_proj_weight
    new.out_proj = _to_masked(m.out_proj, MaskedLinear)  # a Linear subclass: name the target
    new.train(m.training)
    return new


def _mha_to_plain(m: MaskedMultiheadAttention) -> nn.MultiheadAttention:
    """A plain nn.MultiheadAttention with the masks' zeros written into both projections."""
    dt = m.in_proj_weight.dtype
    new = nn.MultiheadAttention(**_mha_ctor_kwargs(m), device=m.in_proj_weight.device, dtype=dt)
    with torch.no_grad():
        new.in_proj_weight.copy_(m.in_proj_weight * m.mask.to(dt))
        new.out_proj.weight.copy_(m.out_proj.weight * m.out_proj.mask.to(dt))
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            if getattr(m, name) is not None:
                getattr(new, name).copy_(getattr(m, name))
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias)
    new.train(m.training)
    return new


_SOURCE_CACHE: Dict[type, str] = {}


def _forward_source(cls: type) -> str:
    """Source of the ``forward`` that ``cls`` runs, with its bases' while it calls ``super()``
    ("" where unavailable). Only forward: initialisation code reads ``self.fc.weight``
    legitimately."""
    if cls not in _SOURCE_CACHE:
        parts = []
        for c in cls.__mro__:
            fwd = c.__dict__.get("forward")
            if c is nn.Module or fwd is None:
                continue
            try:
                parts.append(inspect.getsource(fwd))
            except (OSError, TypeError):
                break
            if "super(" not in parts[-1]:
                break  # an overriding forward that does not call its base's
        _SOURCE_CACHE[cls] = "\n".join(parts)
    return _SOURCE_CACHE[cls]


def _bypassed(model: nn.Module, name: str) -> Optional[str]:
    """The parent class whose code reads ``<child>.weight`` (or an attention child's projection
    weights) directly, bypassing a masked forward, or None."""
    parent_name, _, child = name.rpartition(".")
    if not child:
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    # weight, or an attention layer's projections (nn.TransformerEncoderLayer's fast path reads them)
    attr = r"\s*\.\s*(?:weight|in_proj_weight|out_proj\s*\.\s*weight)\b"
    if re.search(r"\.\s*" + re.escape(child) + attr, _forward_source(type(parent))):
        return type(parent).__name__
    return None


_UNSUPPORTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention)


def _skipped(model: nn.Module) -> List[Dict[str, object]]:
    """Weight-bearing layers that are not masked, with the reason (see the module docstring)."""
    out, inside = [], []
    for name, m in model.named_modules():
        if isinstance(m, MASKED_TYPES) or any(name.startswith(p + ".") for p in inside):
            continue
        if not isinstance(m, _UNSUPPORTED) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            continue
        if isinstance(m, nn.MultiheadAttention):
            inside.append(name)  # its out_proj is part of it
        numel = sum(p.numel() for p in m.parameters(recurse=isinstance(m, nn.MultiheadAttention))
                    if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 2)
        owner = _bypassed(model, name) if type(m) in MASKED_OF or type(m) is nn.MultiheadAttention else None
        tied = _tied(model, name) if type(m) in MASKED_OF else None
        if owner:
            reason = f"weight read directly by {owner} (outside the masked forward)"
        elif tied:
            reason = f"weight tied to {tied} (a mask would act on one of its uses only)"
        elif _maskable(m):
            reason = "not masked (include/exclude, or not sparsified)"
        elif type(m) is nn.MultiheadAttention and not _mha_supported(m):
            reason = "separate q/k/v projection weights (kdim/vdim) are not supported"
        else:
            reason = f"unsupported layer type {type(m).__name__}"
        out.append({"name": name, "type": type(m).__name__, "numel": numel, "reason": reason})
    return out


def sparsify(model: nn.Module, include: Selector = None, exclude: Selector = None) -> nn.Module:
    """Swap conv / linear modules (``MASKED_OF``) for their masked versions in place; return the model.

    ``include`` / ``exclude``: module names or glob patterns (e.g. ``"layer1.*"``), or a
    callable ``(name, module) -> bool``. Weights and biases are kept (the same Parameters); scores
    start as a float32 copy of the weights and masks as all-True. Already-masked modules are kept.
    If ``model`` itself is such a layer, the new module is returned.

    Layers left dense for a reason other than include/exclude (an unsupported type, a weight its
    parent reads directly) are named in a UserWarning; a model with nothing to mask warns too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    chosen = set(layer_selection(model, include, exclude))
    for name, m in _candidates(model):
        if name not in chosen or isinstance(m, MASKED_TYPES):
            continue
        new = _mha_to_masked(m) if isinstance(m, nn.MultiheadAttention) else _to_masked(m)
        if name == "":
            return new
        _swap(model, name, new)
    left = [s for s in _skipped(model) if not s["reason"].startswith("not masked")]
    if left:
        shown = ", ".join(f"{s['name']} ({s['reason']})" for s in left[:6])
        more = f" and {len(left) - 6} more" if len(left) > 6 else ""
        warnings.warn(f"sparsify: {len(left)} layer(s) left dense and not pruned: {shown}{more}; "
                      f"see sparsity_report(model)['skipped']", UserWarning, stacklevel=2)
    if not masked_modules(model):
        warnings.warn("sparsify: the model has no conv / linear layer to mask; it is returned "
                      "unchanged", UserWarning, stacklevel=2)
    return model


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the layers include / exclude choose from: the maskable layers whose
    weight goes through their own forward, and the masked layers (not those inside another one,
    an attention layer's out_proj), in registration order."""
    out: List[Tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if isinstance(m, MASKED_TYPES):
            if not any(p == "" or n.startswith(p + ".") for p, q in out if isinstance(q, MASKED_TYPES)):
                out.append((n, m))
        elif _maskable(m) and not _bypassed(model, n) and not _tied(model, n):
            out.append((n, m))
    return out


def _tied(model: nn.Module, name: str) -> Optional[str]:
    """Another module holding the very weight Parameter of layer ``name`` (tied weights, e.g. a
    language model's decoder and its word embeddings), or None. A mask would act on one use of the
    weight only, and :func:`finalize` would untie them."""
    w = getattr(model.get_submodule(name), "weight", None) if name else getattr(model, "weight", None)
    if not isinstance(w, nn.Parameter):
        return None
    for other, mod in model.named_modules(remove_duplicate=False):
        if other == name or (name and other.startswith(name + ".")):
            continue
        if any(p is w for p in mod.parameters(recurse=False)):
            return other
    return None


def layer_selection(model: nn.Module, include: Selector = None, exclude: Selector = None) -> List[str]:
    """Names of the layers that ``include`` / ``exclude`` (as in :func:`sparsify`) select among the
    model's maskable and already masked layers, in registration order; a pattern that matches no
    such layer raises ValueError. On a plain model these are the layers :func:`sparsify` masks."""
    cands = _candidates(model)
    names = [n for n, _ in cands]
    inc = _selector(include, "include", names)
    exc = _selector(exclude, "exclude", names)
    return [n for n, m in cands if (inc is None or inc(n, m)) and not (exc is not None and exc(n, m))]


def finalize(model: nn.Module) -> nn.Module:
    """Turn masked modules back into plain layers (nn.Conv2d, nn.Linear, nn.BatchNorm2d, ...) with the
    masks' zeros baked in (weight masks, bias masks, BatchNorm channel masks)."""
    if isinstance(model, MASKED_TYPES + MASKED_NORM_TYPES):
        return _to_plain(model)
    done: List[str] = []
    for name, m in list(model.named_modules()):
        if isinstance(m, MASKED_TYPES + MASKED_NORM_TYPES) and not any(name.startswith(d + ".") for d in done):
            _swap(model, name, _to_plain(m))
            done.append(name)  # an attention layer's out_proj goes with it
    return model


def mask_norms(model: nn.Module, names) -> nn.Module:
    """Make the named BatchNorm layers of ``model`` channel-masked (:mod:`bip_fast.nn.norm`), in
    place (already masked ones stay)."""
    for name in names:
        bn = model.get_submodule(name)
        if type(bn) in MASKED_NORM_OF:
            new = to_masked_norm(bn)
            if not name:
                return new
            _swap(model, name, new)
    return model


def _to_plain(m: nn.Module) -> nn.Module:
    if isinstance(m, MaskedMultiheadAttention):
        return _mha_to_plain(m)
    if isinstance(m, MASKED_NORM_TYPES):
        return m.to_plain()
    dev, dt = m.weight.device, m.weight.dtype
    new = PLAIN_OF[type(m)](**_ctor_kwargs(m), device="meta", dtype=dt)
    with torch.no_grad():
        new.weight = nn.Parameter(m.weight.detach() * m.mask.to(dt), requires_grad=m.weight.requires_grad)
        new.bias = None if m.bias is None else nn.Parameter(m._masked_bias().detach().clone(),
                                                            requires_grad=m.bias.requires_grad)
    new.to(dev)
    new.train(m.training)
    return new


def masked_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every masked module, in registration order (the tie-break order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]


def prunable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [m.weight for _, m in masked_modules(model)]


def score_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [m.scores for _, m in masked_modules(model)]


def other_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter that is neither a masked weight nor a score (biases, norms, ...)."""
    skip = {id(p) for p in prunable_parameters(model)} | {id(p) for p in score_parameters(model)}
    return [p for p in model.parameters() if id(p) not in skip]


# Set by a MACs / parameter budget's projection (bip_fast.masks.budget.record): {"kind", "target",
# "macs", "params"}, the last two the kept fractions of the dense model (0-dim tensors).
BUDGET_ATTR = "_bip_fast_budget"


def sparsity_report(model: nn.Module) -> Dict[str, object]:
    """Per-layer and total density of the masked modules' current masks, under ``empty_layers`` the
    names of the layers whose mask keeps no weight (layer collapse: a layer that every path of the
    network crosses then cuts the output off from the input), and under ``skipped``
    the weight-bearing layers that are not masked (name, type, numel, reason); their weights are
    not counted in ``numel``. Where the masks come from a ``macs=`` / ``params=`` budget
    (``structure="group"``), ``budget`` gives it: ``{"kind", "target", "macs", "params"}``, the
    last two the fractions of the dense model's MACs and parameters that the last projection kept."""
    layers, total, kept = [], 0, 0
    for name, m in masked_modules(model):
        n = m.mask.numel()
        k = int(m.mask.sum())
        layers.append({"name": name, "shape": tuple(m.weight.shape), "numel": n, "kept": k, "density": k / n})
        total += n
        kept += k
    density = kept / total if total else 1.0
    out = {"layers": layers, "numel": total, "kept": kept, "density": density, "sparsity": 1.0 - density,
           "empty_layers": [r["name"] for r in layers if r["kept"] == 0], "skipped": _skipped(model)}
    budget = getattr(model, BUDGET_ATTR, None)
    if budget is not None:
        out["budget"] = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in budget.items()}
    return out
