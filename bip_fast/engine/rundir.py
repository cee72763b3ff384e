"""A run folder and the model files in it: names, the folder policy, reading models back.

Writes go through :mod:`bip_fast.files` (atomic, checksummed); this module decides *which*
files a run owns (``RUN_FILES``), when a folder may be (re)used (:func:`check_out_dir`), and how a
model.pt / checkpoint.pt / run folder given on the command line becomes a state dict checked
against its run's record (:func:`read_model_file`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ..files import checkpoint as ckpt
from ..files import integrity
from ..nn import masked_modules, sparsify
from ..nn.convert import mask_norms
from .checks import check_same_run
from .hparams import RunConfig

__all__ = ["RUN_FORMAT", "REWIND_FORMAT", "CHECKPOINT", "METRICS", "REWIND", "RUN_FILES", "EXPORT_FILES",
           "check_out_dir", "resolve_model_path", "read_model_file", "read_rewind_file", "load_state_into",
           "strict_json", "cpu_state"]

RUN_FORMAT = "bip_fast.run/1"
REWIND_FORMAT = "bip_fast.rewind/1"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
REWIND = "rewind.pt"  # pretrain: the dense weights at the start of epoch --rewind-epoch, for IMP
RUN_FILES = (CHECKPOINT, METRICS, "config.yaml", "model.pt", "masks.pt", "results.json", REWIND)
EXPORT_FILES = ("model_dense_format.pt", "masks.pt", "model_compact.pt2", "model.onnx", "model_compact.onnx")


def check_out_dir(out, resume: bool, force: bool) -> Path:
    """The run-folder policy: ``resume`` needs ``out/checkpoint.pt``; otherwise a folder already
    holding a run's files is refused unless ``force`` (a folder holding only the config.yaml of a
    run that stopped before its first checkpoint is free)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out: '{out}' exists and is not a directory")
    if resume:
        if not (path / CHECKPOINT).is_file():
            hint = (" (the run stopped before its first epoch ended: rerun the command without --resume)"
                    if (path / "config.yaml").is_file() else "")
            raise FileNotFoundError(f"resume: no {CHECKPOINT} in '{out}' to resume from{hint}")
        return path
    present = [f for f in RUN_FILES if (path / f).exists()]
    present += sorted(p.name for p in path.glob("round_*.pt")) if path.is_dir() else []
    if "config.yaml" in present and set(present) <= {"config.yaml", REWIND}:
        present = []  # a run that ended before its first checkpoint: nothing to lose
    if present and not force:
        raise ValueError(f"out: '{out}' already holds a run ({', '.join(present)}); pass --resume to "
                         f"continue it or --force to overwrite it")
    return path


def resolve_model_path(path, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt", CHECKPOINT):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{what}: '{path}' holds neither model.pt nor {CHECKPOINT}")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: '{path}' does not exist")
    return p


def read_model_file(path, what: str):
    """-> (state_dict, stored run config dict or None)."""
    p = resolve_model_path(path, what)
    try:
        obj = ckpt.load(p)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    stored = None
    if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
        sd, stored = obj["model"], obj["config"]
        check_same_run(stored, p.parent, what, p)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
        side = p.parent / CHECKPOINT
        if side.is_file() and side != p:  # arch etc. from the run folder's checkpoint
            try:
                side_obj = ckpt.load(side)
                if isinstance(side_obj, dict) and side_obj.get("format") == RUN_FORMAT:
                    stored = side_obj["config"]
            except integrity.ChecksumError:
                raise
            except ValueError:
                stored = None
            if stored is not None:
                check_same_run(stored, p.parent, what, side)
        if stored is None and (p.parent / "config.yaml").is_file():
            try:
                stored = RunConfig.from_yaml(p.parent / "config.yaml").to_dict()
            except (ValueError, FileNotFoundError):
                stored = None
    else:
        raise ValueError(f"{what}: '{p}' is neither a bip_fast checkpoint nor a model state dict")
    return sd, stored


def read_rewind_file(pretrained, rewind_epoch):
    """-> (state_dict, epoch): the rewind weights a ``pretrain`` run kept beside the model
    ``pretrained`` (a run folder, or a file in one), for ``prune --method imp --pretrained``.

    Refuses (ValueError, one line saying what to do) when there is no ``rewind.pt`` there, and
    when ``rewind_epoch`` (None: whatever the run kept) names another epoch than the file's."""
    folder = resolve_model_path(pretrained, "pretrained").parent
    path = folder / REWIND
    if not path.is_file():
        raise ValueError(f"pretrained: IMP rewinds to the dense run's weights of an early epoch (SPEC §5), and "
                         f"'{folder}' holds no {REWIND} with them; pretrain the model with bip_fast (it keeps "
                         f"the start of --rewind-epoch, default 3, in {REWIND}), or pass --rewind-to-pretrained "
                         f"to rewind every round to the pretrained weights instead")
    try:
        obj = ckpt.load(path)
    except ValueError as e:
        raise ValueError(f"pretrained: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != REWIND_FORMAT:
        raise ValueError(f"pretrained: '{path}' is not a bip_fast rewind file")
    check_same_run(obj["config"], folder, "pretrained", path)
    epoch = int(obj["epoch"])
    if rewind_epoch is not None and rewind_epoch != epoch:
        raise ValueError(f"rewind_epoch: '{path}' holds the weights of the start of epoch {epoch}, got "
                         f"--rewind-epoch {rewind_epoch}; drop the flag (or pass {epoch}), or rerun pretrain "
                         f"with --rewind-epoch {rewind_epoch}")
    return obj["model"], epoch


def load_state_into(model: nn.Module, sd: Dict[str, torch.Tensor], what: str, src) -> nn.Module:
    if any(k.endswith(".mask") or k.endswith(".scores") for k in sd) and not masked_modules(model):
        masked = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".mask")}  # a run's --exclude left the others plain
        model = sparsify(model, include=lambda name, _m: name in masked)
    model = mask_norms(model, [k[: -len(".channel_mask")] for k in sd if k.endswith(".channel_mask")])
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:2])[:300]
        raise ValueError(f"{what}: '{src}' does not fit the model: {detail}") from None
    return model


def strict_json(obj):
    """NaN/inf floats -> None, so every line stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
