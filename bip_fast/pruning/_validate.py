"""Argument checks shared by the algorithms: one clear error naming the argument."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..masks import STRUCTURES

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
