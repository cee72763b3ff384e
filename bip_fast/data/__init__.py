"""Datasets and loaders (ground floor: imports torch, numpy and, for JPEG folders, Pillow only).

- :mod:`.cifar`: CIFAR-10/100 from the python-pickle batches, decoded once onto the device;
  class-balanced subsets.
- :mod:`.loaders`: device-side augmentation, the resumable :class:`Loader`, and the two-shuffle
  :class:`BilevelLoader` BiP uses.
- :mod:`.folder`: Tiny-ImageNet and ImageNet JPEG folder trees with decoding workers.
"""
from __future__ import annotations

from . import cifar, folder, loaders
from .cifar import DATASETS, Dataset, load_dataset, resolve_data_dir, subset_indices
from .folder import FolderLoader, load_folder_dataset, scan
from .loaders import PAD, BilevelLoader, Loader, augment_batch, eval_loader

__all__ = [
    "cifar", "folder", "loaders",
    "DATASETS", "Dataset", "load_dataset", "resolve_data_dir", "subset_indices",
    "FolderLoader", "load_folder_dataset", "scan",
    "PAD", "Loader", "BilevelLoader", "augment_batch", "eval_loader",
]
