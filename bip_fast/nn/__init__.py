"""Masked layers and whole-model conversion."""

from .convert import (
    finalize,
    layer_selection,
    masked_modules,
    other_parameters,
    prunable_parameters,
    score_parameters,
    sparsify,
    sparsity_report,
)
from .modules import (
    MASKED_OF,
    MASKED_TYPES,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedConvTranspose1d,
    MaskedConvTranspose2d,
    MaskedConvTranspose3d,
    MaskedLinear,
    MaskedMultiheadAttention,
)
from .outputs import norms_after, output_layers
from .norm import MASKED_NORM_TYPES, MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d, MaskedSyncBatchNorm, to_sync_norms

__all__ = [
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedConvTranspose1d",
    "MaskedConvTranspose2d",
    "MaskedConvTranspose3d",
    "MaskedLinear",
    "MaskedMultiheadAttention",
    "norms_after",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedBatchNorm3d",
    "MaskedSyncBatchNorm",
    "to_sync_norms",
    "MASKED_NORM_TYPES",
    "MASKED_TYPES",
    "MASKED_OF",
    "sparsify",
    "finalize",
    "sparsity_report",
    "masked_modules",
    "layer_selection",
    "output_layers",
    "prunable_parameters",
    "score_parameters",
    "other_parameters",
]
