"""Accuracy of a model, and the ``eval`` and ``export`` commands on a saved model."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Set

import torch
from torch import nn

from ..compaction import compact as compact_model, export_compact
from ..data import load_dataset, load_folder_dataset
from ..files import checkpoint as ckpt
from ..masks import save_masks
from ..models import build
from ..nn import finalize, masked_modules, sparsify, sparsity_report
from ..onnx_export import onnx_bytes, require_onnx, write_onnx
from .hparams import FOLDER_DATASETS, RunConfig
from .rundir import EXPORT_FILES, cpu_state, load_state_into, read_model_file
from .setup import example_input, resolve_device

__all__ = ["evaluate", "density", "mask_state", "load_model", "evaluate_checkpoint", "export_checkpoint"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, bf16: bool = False) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` in eval mode (one host sync at the end)."""
    was = model.training
    model.eval()
    correct = None
    n = 0
    for x, y in loader:
        dev = x.device.type
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        c = (out.argmax(dim=1) == y).sum()
        correct = c if correct is None else correct + c
        n += y.shape[0]
    model.train(was)
    return 0.0 if n == 0 else float(correct) / n


def density(model: nn.Module) -> float:
    mods = masked_modules(model)
    total = sum(m.mask.numel() for _, m in mods)
    if total == 0:
        return 1.0
    return float(sum(m.mask.sum() for _, m in mods)) / total


def mask_state(model: nn.Module, warned: Optional[Set[str]] = None) -> Dict[str, Any]:
    """{"density"} of the model's masks and, when a mask keeps no weight of some layer,
    {"empty_layers": names} with a warning: such a layer cuts the network's output off from its
    input wherever every path crosses it, and its weights get no gradient again. Global masks at
    high sparsity can do this (docs/results.md, "Layer collapse"). ``warned``: layers already warned
    about (the algorithm's ``collapse.warned``, shared so that one collapse gives one warning);
    the newly warned ones are added to it."""
    rep = sparsity_report(model)
    out: Dict[str, Any] = {"density": rep["density"]}
    if rep["empty_layers"]:
        out["empty_layers"] = rep["empty_layers"]
        new = [n for n in rep["empty_layers"] if warned is None or n not in warned]
        if warned is not None:
            warned.update(new)
        if new:
            warnings.warn(f"layer collapse: the masks keep no weight of {', '.join(new)} "
                          f"({len(rep['empty_layers'])} masked layers empty, density {rep['density']:.4g}); a layer "
                          f"on every path cuts the output off from the input. A lower score learning rate or a "
                          f"layer-wise structure avoids it", UserWarning, stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------
# eval / export
# --------------------------------------------------------------------------------------------

def load_model(path, cfg: RunConfig, num_classes: int, what: str = "checkpoint") -> nn.Module:
    """A model (masked if the file holds masks) from a model.pt / checkpoint.pt / run folder. The
    architecture is the one recorded with the file when there is a record, else ``cfg``'s."""
    sd, stored = read_model_file(path, what)
    arch = stored["model"]["arch"] if stored else cfg.model.arch
    model = build(arch, num_classes)
    return load_state_into(model, sd, what, path)


def num_classes_of(sd: Dict[str, torch.Tensor], stored) -> int:
    if stored and stored.get("data", {}).get("dataset", "cifar10").lower().replace("-", "") == "cifar100":
        return 100
    key = [k for k in sd if k.endswith(".weight") and sd[k].dim() == 2]
    return int(sd[key[-1]].shape[0]) if key else 10


def evaluate_checkpoint(cfg: RunConfig) -> Dict[str, Any]:
    """Test accuracy and sparsity of ``cfg.checkpoint`` on ``cfg``'s dataset / subset."""
    sd, stored = read_model_file(cfg.checkpoint, "checkpoint")  # fail before loading data
    model = load_model(cfg.checkpoint, cfg, num_classes_of(sd, stored))
    dev = resolve_device(cfg.train.device)
    if cfg.data.dataset.lower() in FOLDER_DATASETS:
        fd = load_folder_dataset(cfg.data.dataset.lower(), cfg.data.data_dir)
        loader = fd.test_loader(cfg.data.test_batch_size, num_workers=cfg.data.workers, device=dev)
        n_test = len(fd.test_samples)
    else:
        subset = tuple(cfg.data.subset) if cfg.data.subset is not None else None
        ds = load_dataset(cfg.data.dataset, cfg.data.data_dir, device=dev, subset=subset, seed=cfg.train.seed)
        loader, n_test = ds.test_loader(cfg.data.test_batch_size), int(ds.test_y.numel())
    model = model.to(dev)
    acc = evaluate(model, loader, bf16=cfg.train.bf16)
    rep = sparsity_report(model)
    return {"test_acc": acc, "density": rep["density"], "sparsity": rep["sparsity"], "prunable": rep["numel"],
            "kept": rep["kept"], "test_samples": n_test}


def export_checkpoint(cfg: RunConfig, num_classes: Optional[int] = None, compact: bool = False,
                      onnx: bool = False) -> Dict[str, str]:
    """Write ``model_dense_format.pt`` (state dict of the finalize()d plain model: masked weights
    zeroed, loadable into ``models.build(arch)``) and ``masks.pt`` (``bip_fast.masks.save_masks``).
    With ``compact``: also ``model_compact.pt2``, the model with its removed channels cut out
    (:func:`bip_fast.compact`) saved by ``torch.export``; ``torch.export.load(path).module()``
    loads it without bip_fast (batch size free, the dataset's image size).
    With ``onnx``: also ``model.onnx`` (the finalized dense-format model), or with ``compact``
    ``model_compact.onnx`` (the compacted one), checked with ONNX Runtime
    (:func:`bip_fast.export_onnx`); it is made and checked before any file is written."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: '{cfg.out}' exists and is not a directory")
    present = [f for f in EXPORT_FILES if (out / f).exists()]
    if present and not cfg.force:
        raise ValueError(f"out: '{cfg.out}' already holds {', '.join(present)}; pass --force to overwrite")
    sd, stored = read_model_file(cfg.checkpoint, "checkpoint")
    if num_classes is None:
        num_classes = num_classes_of(sd, stored)
    model = load_model(cfg.checkpoint, cfg, num_classes)
    if not masked_modules(model):
        model = sparsify(model)  # a dense model: all-True masks
    onnx_file = small = None
    ex = example_input(cfg.data.dataset)
    if onnx:  # a missing package or a model the exporter cannot take: refused before anything is written
        require_onnx()
        small = compact_model(model.cpu().eval(), ex, return_report=True) if compact else None
        target = small[0] if compact else model.cpu().eval()
        onnx_file = ("model_compact.onnx" if compact else "model.onnx",) + onnx_bytes(target, ex)
    out.mkdir(parents=True, exist_ok=True)
    save_masks(model, out / "masks.pt")
    plain = finalize(copy.deepcopy(model))
    ckpt.save_atomic(cpu_state(plain), out / "model_dense_format.pt")
    rep = {"model": str(out / "model_dense_format.pt"), "masks": str(out / "masks.pt")}
    if compact:
        done = export_compact(model.cpu().eval(), ex, out / "model_compact.pt2", compacted=small)  # compacted once
        rep.update(compact=done["path"], compact_params=done["params"], params=done["masked_params"])
    if onnx_file is not None:
        name, data, info = onnx_file
        rep.update(onnx=write_onnx(data, out / name), onnx_opset=info["opset"], onnx_max_abs_diff=info["max_abs_diff"])
    return rep
