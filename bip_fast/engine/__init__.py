"""The top floor: runs. A :class:`Trainer` drives the pruning algorithms over the data, and the
commands around it (hyper-parameters, run folders, eval and export) compose the floors below.

Modules: :mod:`.sections` and :mod:`.hparams` (configuration), :mod:`.plan` (segments of a run),
:mod:`.setup` (device, loaders, algorithm of a segment), :mod:`.baselines` (the one-shot
baselines' inputs), :mod:`.loop` (the Trainer), :mod:`.rundir` and :mod:`.checks` (run folders
and what a run checks before touching one), :mod:`.evaluation` (accuracy, eval and export),
:mod:`.tblog` (``--tensorboard``: the metrics as TensorBoard events).
See docs/architecture.md for what each floor may import.
"""
from __future__ import annotations

from .evaluation import evaluate, evaluate_checkpoint, export_checkpoint, load_model
from .hparams import METHOD_DEFAULTS, RunConfig
from .loop import DivergedError, Trainer
from .plan import Segment, plan_segments

__all__ = [
    "Trainer", "DivergedError", "RunConfig", "METHOD_DEFAULTS", "Segment", "plan_segments",
    "evaluate", "evaluate_checkpoint", "export_checkpoint", "load_model",
]
