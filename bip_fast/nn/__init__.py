"""Masked layers and whole-model conversion."""

from .convert import (
    finalize,
    masked_modules,
    other_parameters,
    prunable_parameters,
    score_parameters,
    sparsify,
    sparsity_report,
)
from .modules import MASKED_TYPES, MaskedConv2d, MaskedLinear

__all__ = [
    "MaskedConv2d",
    "MaskedLinear",
    "MASKED_TYPES",
    "sparsify",
    "finalize",
    "sparsity_report",
    "masked_modules",
    "prunable_parameters",
    "score_parameters",
    "other_parameters",
]
