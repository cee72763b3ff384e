"""Training engine: device-resident CIFAR data, the model zoo, checkpoints (and, in their own
modules, the training loop and hyper-parameters).

``data``, ``models`` and ``checkpoint`` are imported eagerly (they need only torch/numpy; the
torchvision import happens on use). ``loop`` and ``hparams`` are imported on first attribute
access, so importing the engine stays cheap.
"""
from __future__ import annotations

import importlib

from . import checkpoint, data, models
from .checkpoint import load, rng_state, save_atomic, set_rng_state
from .data import BilevelLoader, Dataset, Loader, eval_loader, load_dataset
from .models import ARCHS, build

__all__ = [
    "checkpoint", "data", "models", "loop", "hparams",
    "load_dataset", "Dataset", "Loader", "BilevelLoader", "eval_loader",
    "build", "ARCHS",
    "save_atomic", "load", "rng_state", "set_rng_state",
]

_LAZY = ("loop", "hparams")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
