"""What a run is made of: its device and process group, its loaders, its algorithm.

Each function here turns part of a resolved :class:`RunConfig` into objects of the floors below
(:mod:`bip_fast.data`, :mod:`bip_fast.models`, :mod:`bip_fast.pruning`); the
:class:`~bip_fast.engine.loop.Trainer` composes them.

Distributed (torchrun, or any initialised ``torch.distributed`` group with world size > 1):
every rank draws the same global batch from the same shuffled order and keeps its slice
(``batch_size`` must divide by the world size); the model is wrapped in DistributedDataParallel,
so gradients (weights and scores) are averaged and the masks, projected from identical scores,
are identical on every rank. Only rank 0 writes files. BatchNorm statistics are per-rank (not
synchronised) unless ``sync_bn`` is set (GPU only: SyncBatchNorm needs CUDA tensors), so a model
with BatchNorm matches a one-process run only approximately. BiP's paper-variant implicit-gradient
term -(1/gamma)·m⊙g⊙g needs the rank-averaged gradient ḡ (the square of the mean, not the mean of
per-rank squares): under DDP the masked layers compute only the part linear in g, which averages
exactly, and BiP adds the term after the all-reduce from weight.grad = m⊙ḡ (``pruning/bip.py``),
so the score gradient equals a one-process run's on the same global batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..data import BilevelLoader, Dataset, Loader, eval_loader, load_dataset, load_folder_dataset
from ..data.folder import SPECS
from ..masks import attach_groups
from ..nn import layer_selection, sparsify
from ..pruning import get_algorithm
from . import baselines
from .hparams import FOLDER_DATASETS, METHOD_DEFAULTS, RunConfig, layer_patterns
from .plan import resolved_score_lr

__all__ = ["resolve_device", "dist_info", "init_distributed_from_env", "Loaders", "make_loaders",
           "build_algorithm", "example_input", "Forward", "wrap_forward"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return dev


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1):
    nccl on CUDA machines, gloo otherwise. Returns whether a group is active."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

@dataclass
class Loaders:
    """The loaders of one run: ``upper`` (also the plain training loader), ``lower`` (BiP's second
    shuffle), ``bilevel`` (both, BiP's iteration), ``test``; ``dataset`` as placed on the device."""

    dataset: Any
    upper: Any
    lower: Any
    bilevel: BilevelLoader
    test: Any

    @property
    def steps_per_epoch(self) -> int:
        return len(self.upper)


def make_loaders(cfg: RunConfig, dataset, device: torch.device) -> Loaders:
    """The run's loaders on ``device``; ``dataset`` is a ready dataset (CIFAR tensors are moved to
    ``device``) or None to load the config's."""
    cl = cfg.data.channels_last
    bs, seed = cfg.data.batch_size, cfg.train.seed
    if cfg.data.dataset.lower() in FOLDER_DATASETS:
        fd = dataset if dataset is not None else load_folder_dataset(cfg.data.dataset.lower(), cfg.data.data_dir)
        kw = dict(num_workers=cfg.data.workers, device=device, channels_last=cl)
        upper = fd.train_loader(bs, seed=seed, **kw)
        lower = fd.train_loader(bs, seed=seed + 1, **kw)
        return Loaders(fd, upper, lower, BilevelLoader(lower, upper), fd.test_loader(cfg.data.test_batch_size, **kw))
    if dataset is None:
        subset = tuple(cfg.data.subset) if cfg.data.subset is not None else None
        ds = load_dataset(cfg.data.dataset, cfg.data.data_dir, device=device, subset=subset, seed=cfg.train.seed)
    else:
        ds = Dataset(dataset.train_x.to(device), dataset.train_y.to(device), dataset.test_x.to(device),
                     dataset.test_y.to(device), dataset.num_classes, dataset.mean, dataset.std, dataset.name)
    upper = Loader(ds.train_x, ds.train_y, bs, train=True, mean=ds.mean, std=ds.std, seed=seed, channels_last=cl)
    lower = Loader(ds.train_x, ds.train_y, bs, train=True, mean=ds.mean, std=ds.std, seed=seed + 1,
                   channels_last=cl)
    test = eval_loader(ds.test_x, ds.test_y, cfg.data.test_batch_size, mean=ds.mean, std=ds.std, channels_last=cl)
    return Loaders(ds, upper, lower, BilevelLoader(lower, upper), test)


# --------------------------------------------------------------------------------------------
# algorithm
# --------------------------------------------------------------------------------------------

def example_input(dataset: str, batch: int = 2) -> torch.Tensor:
    """A random input batch of ``dataset``'s image size (CIFAR 32, Tiny-ImageNet 64, ImageNet 224)."""
    size = SPECS[dataset.lower()]["size"] if dataset.lower() in SPECS else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def build_algorithm(seg, cfg: RunConfig, model: nn.Module, steps_per_epoch: int,
                    place: Callable[[nn.Module], nn.Module]):
    """A new algorithm of ``seg.kind`` (a :class:`~bip_fast.engine.plan.Segment`) around ``model``,
    sparsified first when the segment masks (``place`` puts the new score/mask tensors on the
    run's device and memory format). ``--include`` / ``--exclude`` choose the layers sparsified,
    and go to the algorithm too (which keeps a layer producing the model's output dense under the
    filter and channel structures unless ``--include`` selects it); a pattern that matches no layer
    is refused when the run's first segment is built, before the run folder is touched."""
    p, t = cfg.prune, cfg.train
    total = seg.epochs * steps_per_epoch
    sel = dict(include=layer_patterns(p.include), exclude=layer_patterns(p.exclude))
    if cfg.command == "prune" and seg.kind == "dense":
        layer_selection(model, **sel)  # validates the patterns on the dense phase's model
    if seg.kind != "dense":
        model = place(sparsify(model, **sel))
        if p.structure == "group":  # the coupled channels, traced on one batch of the data's shape
            attach_groups(model, example_input(cfg.data.dataset).to(next(model.parameters()).device))
    common = dict(momentum=t.momentum, total_steps=total)
    # --macs / --params (structure group) replace --sparsity
    goal = dict(sparsity=p.sparsity) if p.macs is None and p.params is None else dict(macs=p.macs, params=p.params)
    if seg.kind == "dense":
        if cfg.command == "prune":  # dense phase before pruning: the dense schedule
            kw = dict(lr=METHOD_DEFAULTS["dense"]["lr"], weight_decay=METHOD_DEFAULTS["dense"]["weight_decay"])
        else:
            kw = dict(lr=t.lr, weight_decay=t.weight_decay)
        return get_algorithm("dense")(model, **kw, **common)
    if seg.kind == "bip":
        return get_algorithm("bip")(
            model, **goal, structure=p.structure, schedule=p.schedule, variant=p.variant,
            lr=t.lr, score_lr=resolved_score_lr(cfg, total), weight_decay=t.weight_decay,
            score_weight_decay=p.score_weight_decay, gamma=p.gamma, lr2=p.lr2, score_init=p.score_init,
            mask_freeze=p.mask_freeze, bn_correction=p.bn_correction, unit_scores=p.unit_scores,
            n=p.nm_n, m=p.nm_m, **common, **sel)
    if seg.kind == "omp":
        return get_algorithm("omp")(model, **goal, structure=p.structure, lr=t.lr,
                                    weight_decay=t.weight_decay, n=p.nm_n, m=p.nm_m, **common, **sel)
    if seg.kind == "imp":
        rewind = 0 if cfg.model.pretrained else p.rewind_epoch * steps_per_epoch
        # the default lands on --sparsity (the last round prunes less); --rounds: the fixed series
        target = goal if p.rounds is None else {}
        return get_algorithm("imp")(model, rate=p.imp_rate, **target, rewind_step=rewind,
                                    structure=p.structure or "global", lr=t.lr, weight_decay=t.weight_decay,
                                    **common, **sel)
    if seg.kind == "hydra":
        score_total = max(p.hydra_score_epochs, 1) * steps_per_epoch
        return get_algorithm("hydra")(
            model, **goal, structure=p.structure, score_lr=p.score_lr,
            score_weight_decay=p.score_weight_decay, lr=t.lr, weight_decay=t.weight_decay,
            momentum=t.momentum, total_steps=score_total, finetune_steps=t.epochs * steps_per_epoch,
            n=p.nm_n, m=p.nm_m, **sel)
    if seg.kind in baselines.BASELINES:
        return baselines.build(seg.kind, model, cfg, steps_per_epoch, dict(common, **sel))
    raise ValueError(f"segment kind {seg.kind!r} unknown")


# --------------------------------------------------------------------------------------------
# forward wrappers (DDP, torch.compile)
# --------------------------------------------------------------------------------------------

class Forward:
    """What an algorithm sees as its model when the forward must go through a wrapper (DDP,
    torch.compile): calls go to the wrapper, everything else (parameters, modules, state_dict,
    train/eval) to the plain model, so state-dict keys never change."""

    def __init__(self, wrapper: Callable, inner: nn.Module):
        self.__dict__["_wrapper"] = wrapper
        self.__dict__["_inner"] = inner

    def __call__(self, *args, **kwargs):
        w = self._wrapper
        if isinstance(w, nn.Module):
            w.training = self._inner.training
        return w(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def wrap_forward(alg, inner: nn.Module, cfg: RunConfig, world: int, device: torch.device) -> None:
    """Route the algorithm's forward through DDP / torch.compile when asked."""
    fwd: Callable = inner
    if cfg.train.compile:
        fwd = torch.compile(inner)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(inner, device_ids=ids)
        if cfg.train.compile:
            ddp = torch.compile(ddp)
        fwd = ddp
    if fwd is not inner:
        alg.model = Forward(fwd, inner)
