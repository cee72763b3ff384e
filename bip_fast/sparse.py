"""What unstructured and N:M masks can honestly give: smaller files, and sparse kernels where they
measure faster.

- :func:`save_sparse` / :func:`load_sparse`: a checkpoint of the pruned model (masked weights zero,
  norm statistics, biases; no scores) in which every masked weight is stored as its kept values
  plus either a packed bitmask (1 bit per weight) or CSR (row offsets, int16/int32 column
  indices), whichever is smaller for that tensor: at 90% sparsity the bitmask (0.125 + 0.1 · 4
  bytes per fp32 weight, 0.13 of dense), from about 97% CSR. :func:`load_sparse` gives back the
  dense-format state dict bit for bit (pruned entries +0.0), loadable into the plain architecture.
- :func:`to_sparse_linear`: nn.Linear layers whose weight is at least ``min_sparsity`` zeros become
  :class:`CSRLinear` (``torch.sparse.mm`` on a CSR weight). Whether that is faster depends on the
  sparsity, the batch and the CPU: ``benchmarks/compact.py`` measures it; never assume it.
- :func:`to_semi_structured`: 2:4-masked nn.Linear weights as PyTorch semi-structured sparse
  tensors (CUDA, compute capability >= 8.0, fp16/bf16), which run on the sparse tensor cores.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from .files.checkpoint import load, save_atomic
from .nn import finalize, masked_modules
from .nn.convert import _swap

FORMAT = "bip_fast.sparse/1"

__all__ = ["save_sparse", "load_sparse", "sparse_state", "dense_state", "CSRLinear", "to_sparse_linear",
           "to_semi_structured", "semi_structured_unavailable"]


# ----------------------------------------------------------------------------- checkpoint
def _pack(w: torch.Tensor, keep: torch.Tensor) -> Dict[str, object]:
    """The smaller of bitmask+values and CSR+values for one weight (2-D view: rows = dim 0)."""
    w, keep = w.detach().cpu().contiguous(), keep.cpu().contiguous()
    rows = w.shape[0] if w.dim() > 0 else 1
    cols = w.numel() // max(rows, 1)
    values = w.reshape(-1)[keep.reshape(-1)].clone()
    nnz = values.numel()
    col_bytes = 2 if cols <= 32767 else 4
    csr_bytes = (rows + 1) * 4 + nnz * col_bytes
    bitmask_bytes = (w.numel() + 7) // 8
    head = {"shape": tuple(w.shape), "dtype": w.dtype, "values": values}
    if csr_bytes < bitmask_bytes:
        k2 = keep.reshape(rows, cols)
        crow = torch.zeros(rows + 1, dtype=torch.int32)
        crow[1:] = k2.sum(dim=1).cumsum(0).to(torch.int32)
        col = k2.nonzero()[:, 1].to(torch.int16 if col_bytes == 2 else torch.int32)
        return {"layout": "csr", "crow": crow, "col": col, **head}
    flat = keep.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    bits = (flat << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)
    return {"layout": "bitmask", "bits": bits, **head}


def _unpack(entry: Dict[str, object]) -> torch.Tensor:
    shape, dtype, values = entry["shape"], entry["dtype"], entry["values"]
    numel = math.prod(shape)
    out = torch.zeros(numel, dtype=dtype)
    if entry["layout"] == "csr":
        rows = shape[0] if len(shape) else 1
        crow = entry["crow"].long()
        row = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        out[row * (numel // max(rows, 1)) + entry["col"].long()] = values
    else:
        bits = entry["bits"]
        keep = ((bits.unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).view(-1)[:numel].bool()
        out[keep] = values
    return out.view(shape)


def dense_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The pruned model's inference state on the CPU: the plain layers' state dict with every masked
    weight zeroed (+0.0) where its mask is False; scores and masks left out."""
    masks = {name + "." + mod._weight_key: mod.mask for name, mod in masked_modules(model)}
    plain = finalize(_copy(model))
    out = {}
    for k, v in plain.state_dict().items():
        v = v.detach().cpu()
        if k in masks:
            v = torch.where(masks[k].cpu(), v, torch.zeros((), dtype=v.dtype))
        out[k] = v.clone()
    return out


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def sparse_state(model: nn.Module) -> Dict[str, object]:
    """:func:`dense_state` with every masked weight packed (see the module docstring)."""
    masks = {name + "." + mod._weight_key: mod.mask for name, mod in masked_modules(model)}
    if not masks:
        raise ValueError("model: has no masked layers (sparsify it, or prune it, first)")
    tensors: Dict[str, object] = {}
    for k, v in dense_state(model).items():
        tensors[k] = _pack(v, masks[k]) if k in masks else v
    return {"format": FORMAT, "tensors": tensors}


def save_sparse(model: nn.Module, path) -> None:
    """Write :func:`sparse_state` of a masked model to ``path`` (atomic, checksummed)."""
    save_atomic(sparse_state(model), path)


def load_sparse(path) -> Dict[str, torch.Tensor]:
    """The dense-format state dict of a :func:`save_sparse` file, equal bit for bit to
    :func:`dense_state` of the model it was written from."""
    obj = load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"path: {path} is not a bip_fast sparse checkpoint")
    return {k: _unpack(v) if isinstance(v, dict) else v for k, v in obj["tensors"].items()}


# ----------------------------------------------------------------------------- CSR linear
class CSRLinear(nn.Module):
    """An nn.Linear whose weight is a CSR tensor: y = x Wᵀ + b via ``torch.sparse.mm(W, xᵀ)ᵀ``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # PyTorch notes that CSR support is "beta" on every conversion
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def to_sparse_linear(model: nn.Module, min_sparsity: float = 0.9) -> nn.Module:
    """Replace, in place, every plain nn.Linear whose weight has at least ``min_sparsity`` zeros by a
    :class:`CSRLinear` (inference only). Call it on a :func:`bip_fast.finalize`\\ d model."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m.weight.numel() and float((m.weight == 0).float().mean()) >= min_sparsity:
            if not name:
                return CSRLinear(m)
            _swap(model, name, CSRLinear(m))
    return model


# ----------------------------------------------------------------------------- 2:4
def semi_structured_unavailable(device=None) -> Optional[str]:
    """Why 2:4 semi-structured tensors cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"needs compute capability >= 8.0, this GPU has {cap[0]}.{cap[1]}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    return None


def _shape_ok(w: torch.Tensor) -> bool:
    """Whether the semi-structured kernels take a weight of this shape and dtype (PyTorch's table of
    minimum row / column multiples)."""
    cls = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    c = table.get(w.dtype)
    if c is None:
        return w.shape[0] % 64 == 0 and w.shape[1] % 128 == 0
    return w.shape[0] % c.dense_min_rows == 0 and w.shape[1] % c.dense_min_cols == 0


def to_semi_structured(model: nn.Module) -> list:
    """Make the weight of every plain nn.Linear that holds a 2:4 pattern (in each group of 4
    consecutive input weights at most 2 non-zero) a semi-structured sparse tensor, in place. The
    model must be on a CUDA device of compute capability >= 8.0 in fp16 or bf16; layers whose shape
    the sparse kernels do not take stay dense. Returns the names converted."""
    why = semi_structured_unavailable()
    if why:
        raise RuntimeError(f"to_semi_structured: {why}")
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        w = m.weight.detach()
        if w.dtype not in (torch.float16, torch.bfloat16) or not w.is_cuda:
            raise ValueError(f"model: {name!r} is {w.dtype} on {w.device}; 2:4 tensors need fp16/bf16 on CUDA")
        if w.shape[1] % 4 or int((w.reshape(-1, 4) != 0).sum(dim=1).max()) > 2 or not _shape_ok(w):
            continue
        m.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        done.append(name)
    return done
