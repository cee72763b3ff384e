"""bip_fast: sparse networks by bi-level optimisation (BiP), with IMP, OMP, Hydra, SNIP, GraSP,
SynFlow and GMP baselines.

Importing never touches CUDA and never needs the compiled extension; see :func:`build_info`.
"""

from ._ext import build_info
from . import ops
from .ops import available_backends, use_backend, BackendUnavailableError
from .nn import (
    MaskedConv2d,
    MaskedLinear,
    finalize,
    masked_modules,
    sparsify,
    sparsity_report,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "ops",
    "available_backends",
    "use_backend",
    "BackendUnavailableError",
    "MaskedConv2d",
    "MaskedLinear",
    "sparsify",
    "finalize",
    "sparsity_report",
    "masked_modules",
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


def __getattr__(name):
    # The algorithms pull in the training engine; load them on first use.
    if name in ("BiP", "IMP", "OMP", "Hydra", "Dense", "SNIP", "GraSP", "SynFlow", "GMP"):
        from . import pruning

        return getattr(pruning, name)
    raise AttributeError(f"module 'bip_fast' has no attribute {name!r}")
