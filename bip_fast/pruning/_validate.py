"""Argument checks shared by the algorithms: one clear error naming the argument."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..masks import FILTER_NORMS, STRUCTURES
from ..masks.budget import Budget, check_budget
from ._tree import tensor_leaves

Batch = Tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- validation
def _check_number(value, name: str, *, low: float = 0.0, low_inclusive: bool = True,
                  high: float = math.inf, high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if not (math.isfinite(v) or high == math.inf and v == math.inf) or not ok_low or not ok_high:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a value in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_sparsity(sparsity) -> float:
    """``sparsity`` must be a float in [0, 1) (the fraction of prunable weights removed)."""
    return _check_number(sparsity, "sparsity", low=0.0, high=1.0, high_inclusive=False)


def check_target(sparsity, macs, params, structure: Optional[str],
                 required: bool = True) -> Tuple[Optional[float], Optional[Budget]]:
    """``(sparsity, budget)``: exactly one of ``sparsity`` (a float in [0, 1)), ``macs`` and
    ``params`` (the kept fraction of the dense model's MACs / parameters, in (0, 1], with
    ``structure="group"`` only); ``required=False``: at most one (IMP's fixed series has none)."""
    given = [k for k, v in (("sparsity", sparsity), ("macs", macs), ("params", params)) if v is not None]
    if len(given) > 1 or (required and not given):
        raise ValueError(f"sparsity, macs, params: give {'exactly' if required else 'at most'} one target (the "
                         f"fraction of weights removed, or the kept fraction of the dense model's MACs or parameters), "
                         f"got {', '.join(given) if given else 'none'}")
    budget = check_budget(macs, params, structure)
    return (None if sparsity is None else check_sparsity(sparsity)), budget


def _check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def _check_total_steps(total_steps) -> Optional[int]:
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, int):
        raise TypeError(f"total_steps: expected an int or None, got {type(total_steps).__name__}")
    if total_steps <= 0:
        raise ValueError(f"total_steps: expected a positive int or None, got {total_steps}")
    return total_steps


def _check_batch(batch, name: str) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name}: expected an (inputs, targets) pair, got {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected a pair of tensors, got ({type(x).__name__}, {type(y).__name__})")
    return x, y


def _check_any_batch(batch, name: str):
    """With ``compute_loss``: any structure (tensor, dict, list, tuple, nested) holding a tensor."""
    if next(tensor_leaves(batch), None) is None:
        raise TypeError(f"{name}: expected a tensor or a dict / list / tuple holding tensors (any nesting), "
                        f"got {type(batch).__name__} without a tensor")
    return batch


def _check_loss_args(loss_fn, compute_loss) -> None:
    """``loss_fn(logits, targets)`` for (inputs, targets) batches, or ``compute_loss(model, batch)``."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (logits, targets) -> loss, got {type(loss_fn).__name__}")
    if compute_loss is not None and not callable(compute_loss):
        raise TypeError(f"compute_loss: expected a callable (model, batch) -> loss, got {type(compute_loss).__name__}")
    if loss_fn is not None and compute_loss is not None:
        raise ValueError("loss_fn, compute_loss: give one of them; compute_loss(model, batch) computes the whole "
                         "loss, loss_fn(model(x), y) only applies to (inputs, targets) batches")


def _check_loss_value(loss, name: str = "compute_loss") -> torch.Tensor:
    """The value ``compute_loss`` returned: a one-element floating tensor that depends on the model."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{name}: expected a scalar loss tensor, got {type(loss).__name__}")
    if loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"{name}: expected a scalar floating-point loss, got a {loss.dtype} tensor of shape "
                         f"{tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"{name}: the loss does not depend on the model's parameters (requires_grad is False); "
                         f"compute it from model(...) called inside compute_loss, outside torch.no_grad()")
    return loss


def _check_structure(structure: str, sparsity: float, n: int, m: int) -> None:
    _check_choice(structure, "structure", STRUCTURES)
    if structure == "nm":
        for v, nm in ((n, "n"), (m, "m")):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{nm}: expected an int, got {type(v).__name__}")
        if not 0 < n <= m:
            raise ValueError(f"n/m: expected 0 < n <= m, got {n}/{m}")
        if abs((1.0 - sparsity) - n / m) > 1e-9:
            raise ValueError(f"sparsity: {n}:{m} pruning removes {1 - n / m} of the weights, got sparsity={sparsity}")


def _check_filter_norm(filter_norm: str, structure: str) -> str:
    """``filter_norm`` scores whole filters / channels; a structure of single entries has none."""
    _check_choice(filter_norm, "filter_norm", FILTER_NORMS)
    if filter_norm != "l2" and structure not in ("filter", "channel", "group"):
        raise ValueError(f"filter_norm: {filter_norm!r} scores filters, channels or group channels; structure "
                         f"{structure!r} ranks single entries by magnitude (use structure='filter', 'channel' or "
                         f"'group')")
    return filter_norm
