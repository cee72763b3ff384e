"""The saliency baselines (SNIP, GraSP, SynFlow) and GMP inside the training engine.

- :data:`BASELINES` are run by ``prune --method snip|grasp|synflow|gmp`` as one segment of
  ``--epochs``. :data:`AT_INIT` (SNIP, GraSP, SynFlow) are published as pruning at
  initialisation: without ``--pretrained`` they prune the freshly initialised model and train it
  from scratch (no dense phase); with ``--pretrained`` they prune that model and retrain it.
  GMP prunes gradually from ``--pretrained`` (or after a dense phase, like OMP).
- :func:`build` maps the run config onto the classes' constructors; :func:`score_batches` gives
  the one-shot methods the batches of their ``prepare(batches)``: a class-balanced subset of the
  training split (seeded by ``--seed``), normalised, not augmented, in batches of at most
  ``--batch-size``. Its size is ``--score-samples`` (default: SNIP one batch of ``--batch-size``,
  GraSP 10 per class as in its authors' code, SynFlow one image, whose shape is all it reads),
  at most what a class-balanced pick from the (possibly subset) split allows.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..data import FolderLoader, eval_loader, subset_indices
from ..pruning import get_algorithm

__all__ = ["BASELINES", "AT_INIT", "build", "score_batches", "score_sample_count"]

BASELINES = ("snip", "grasp", "synflow", "gmp")
AT_INIT = ("snip", "grasp", "synflow")


def build(kind: str, model: nn.Module, cfg, steps_per_epoch: int, common: Dict[str, Any]):
    """The ``kind`` algorithm around ``model`` from a resolved :class:`RunConfig`; ``common``
    holds ``momentum`` and ``total_steps`` (the segment's), and ``include`` / ``exclude``."""
    p, t = cfg.prune, cfg.train
    kw: Dict[str, Any] = dict(structure=p.structure, lr=t.lr, weight_decay=t.weight_decay, **common)
    if kind == "grasp":
        kw["temperature"] = p.grasp_temperature
    elif kind == "synflow":
        kw["rounds"] = p.synflow_rounds
    elif kind == "gmp":
        kw["prune_every"] = p.gmp_every
        if p.gmp_ramp_epochs is not None:
            if p.gmp_ramp_epochs >= t.epochs:
                raise ValueError(f"gmp_ramp_epochs: must be < epochs ({t.epochs}) so the run finetunes at the "
                                 f"final sparsity, got {p.gmp_ramp_epochs}")
            kw["ramp_steps"] = p.gmp_ramp_epochs * steps_per_epoch
    return get_algorithm(kind)(model, p.sparsity, **kw)


def score_sample_count(cfg, num_classes: int) -> int:
    """Training images the one-shot method's scores see (see the module docstring)."""
    if cfg.prune.score_samples is not None:
        return cfg.prune.score_samples
    return {"grasp": 10 * num_classes, "synflow": 1}.get(cfg.prune.method, cfg.data.batch_size)


def score_batches(cfg, dataset, device=None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The ``prepare(batches)`` input of a one-shot method (see the module docstring); a folder
    dataset (tiny-imagenet, imagenet) is decoded with its evaluation preprocessing on ``device``."""
    c = dataset.num_classes
    folder = hasattr(dataset, "train_samples")
    labels = torch.tensor([label for _, label in dataset.train_samples]) if folder else dataset.train_y
    # As many as asked for, within what a class-balanced pick from this (possibly subset) split allows.
    n = min(score_sample_count(cfg, c), c * int(torch.bincount(labels.cpu(), minlength=c).min()))
    if n < 1:
        raise ValueError(f"score_samples: the training split lacks a class, so no class-balanced batch for "
                         f"{cfg.prune.method} exists")
    idx = subset_indices(labels, n, c, seed=cfg.train.seed)
    if folder:
        loader = FolderLoader([dataset.train_samples[i] for i in idx.tolist()], cfg.data.batch_size, train=False,
                              size=dataset.size, eval_resize=dataset.eval_resize, mean=dataset.mean, std=dataset.std,
                              num_workers=cfg.data.workers, channels_last=cfg.data.channels_last,
                              device=device or "cpu")
    else:
        loader = eval_loader(dataset.train_x[idx], dataset.train_y[idx], cfg.data.batch_size, mean=dataset.mean,
                                  std=dataset.std, channels_last=cfg.data.channels_last)
    return list(loader)
