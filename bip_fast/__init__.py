"""bip_fast: sparse networks by bi-level optimisation (BiP), with IMP, OMP, Hydra, SNIP, GraSP,
SynFlow and GMP baselines.

Importing never touches CUDA and never needs the compiled extension; see :func:`build_info`.
"""

from ._ext import build_info
from . import ops
from .ops import available_backends, use_backend, BackendUnavailableError
from .nn import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedConvTranspose1d,
    MaskedConvTranspose2d,
    MaskedConvTranspose3d,
    MaskedLinear,
    MaskedMultiheadAttention,
    finalize,
    masked_modules,
    sparsify,
    sparsity_report,
)
from .pruning import GMP, IMP, OMP, SNIP, BiP, Dense, GraSP, Hydra, SynFlow
from .masks import attach_groups, find_groups
from .compaction import compact
from .onnx_export import export_onnx  # imports onnx / onnxruntime only when called

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "ops",
    "available_backends",
    "use_backend",
    "BackendUnavailableError",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedConvTranspose1d",
    "MaskedConvTranspose2d",
    "MaskedConvTranspose3d",
    "MaskedLinear",
    "MaskedMultiheadAttention",
    "sparsify",
    "finalize",
    "sparsity_report",
    "masked_modules",
    "attach_groups",
    "find_groups",
    "compact",
    "export_onnx",
    "BiP",
    "IMP",
    "OMP",
    "Hydra",
    "Dense",
    "SNIP",
    "GraSP",
    "SynFlow",
    "GMP",
]

