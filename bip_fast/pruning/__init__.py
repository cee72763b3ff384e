"""Pruning algorithms (one per file) and their registry.

``get_algorithm(name)`` maps "bip", "imp", "omp", "hydra", "dense" and the baselines "snip",
"grasp", "synflow", "gmp" to the classes; every class
shares the :class:`Algorithm` interface (``step(batch, batch2=None) -> metrics``,
``state_dict()``/``load_state_dict()``, ``masks()``, ``sparsity()``, ``param_groups``).
"""

from __future__ import annotations

from typing import Dict, Type

from .base import Algorithm, SGDGroup, cosine_factor
from .bip import BiP, init_scores
from .dense import Dense
from .gmp import GMP
from .grasp import GraSP
from .hydra import Hydra
from .imp import IMP
from .omp import OMP
from .snip import SNIP
from .synflow import SynFlow

ALGORITHMS: Dict[str, Type[Algorithm]] = {"bip": BiP, "imp": IMP, "omp": OMP, "hydra": Hydra, "dense": Dense,
                                          "snip": SNIP, "grasp": GraSP, "synflow": SynFlow, "gmp": GMP}


def get_algorithm(name: str) -> Type[Algorithm]:
    """The algorithm class registered as ``name`` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"name: unknown algorithm {name!r}; valid names: {sorted(ALGORITHMS)}") from None


__all__ = ["Algorithm", "SGDGroup", "cosine_factor", "init_scores", "BiP", "IMP", "OMP", "Hydra", "Dense",
           "SNIP", "GraSP", "SynFlow", "GMP", "ALGORITHMS", "get_algorithm"]
