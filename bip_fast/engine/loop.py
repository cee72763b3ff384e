"""The training loop: one :class:`Trainer` runs any pruning algorithm epoch by epoch.

A run (``pretrain``, ``prune`` or ``finetune``) is planned as a list of *segments*, each a number
of epochs of one algorithm (``bip_fast.pruning``):

- ``pretrain``: ``dense`` (Dense, plain model) -> ``model.pt`` is the plain state dict.
- ``prune --method bip|omp|snip|grasp|synflow|gmp``: the method's segment (:mod:`.baselines`),
  starting from ``--pretrained`` (a model.pt, checkpoint.pt or run folder). Without
  ``--pretrained`` a dense segment of ``--pretrain-epochs`` (default: the dense schedule, 160
  epochs at lr 0.1) runs first in the same run folder (not for SNIP/GraSP/SynFlow).
- ``prune --method hydra``: ``hydra_prune`` (``--hydra-score-epochs`` of score training), then
  ``hydra_finetune`` (``Hydra.finetune()``, ``--epochs`` of weight training under the mask).
- ``prune --method imp``: without ``--pretrained``, round 0 is dense training inside IMP and the
  rewind point is the start of epoch ``--rewind-epoch`` (lottery tickets with rewinding); with
  ``--pretrained`` there is no round 0 and every round rewinds to the pretrained weights. Then
  rounds 1..R (``IMP.next_round()``: prune 20% of the remaining weights, rewind, full retraining
  schedule) with R = IMP.rounds_for(1 - sparsity): the first round whose density is at most the
  target (0.8^R <= 1 - sparsity). Each round ends with ``round_RR.pt`` (model, masks, accuracy).
- ``finetune --checkpoint PATH``: Dense SGD of the masked model under its fixed masks.

Per epoch: the algorithm's ``step`` over the training loader (for BiP a :class:`BilevelLoader`:
lower batch for the weight step, upper batch for the score step; an epoch is one pass of the
upper loader), metrics accumulated on the device (one host sync per ``log_interval`` steps, no
extra forward for logging); evaluation on the test split (eval mode, no grad); one line in
``metrics.jsonl``; an atomic ``checkpoint.pt`` holding everything needed to continue exactly
(model, algorithm state with optimisers / schedule / masks / IMP round / Hydra phase / rewind
state, both loaders' states, RNG states, segment and epoch, history, config). ``resume=True``
continues from it; the resumed run ends bit-identical to an uninterrupted one (same device and
software). Checkpoints are taken at epoch ends only.

Distributed (torchrun, or any initialised ``torch.distributed`` group with world size > 1):
every rank draws the same global batch from the same shuffled order and keeps its slice
(``batch_size`` must divide by the world size); the model is wrapped in DistributedDataParallel,
so gradients (weights and scores) are averaged and the masks, projected from identical scores,
are identical on every rank. Only rank 0 writes files. BatchNorm statistics are per-rank (not
synchronised) unless ``sync_bn`` is set (GPU only: SyncBatchNorm needs CUDA tensors), so a model
with BatchNorm matches a one-process run only approximately. BiP's paper-variant implicit-gradient
term -(1/gamma)·m⊙g⊙g is computed by the masked layers from each rank's own gradient g before
DDP averages the score gradients, so with a finite gamma DDP gives mean(g_r²) where one process
gives (mean g_r)²: a small, documented difference (exact with gamma = inf or the official variant).

Not implemented: CUDA-graph capture of the iteration (documented option of the project brief);
``compile=True`` uses ``torch.compile`` on the forward instead.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from . import integrity
from . import baselines
from . import imagefolder
from .hparams import METHOD_DEFAULTS, RunConfig
from .runlock import RunLock
from ..pruning.base import NonFiniteError

__all__ = ["Trainer", "Segment", "plan_segments", "evaluate", "evaluate_checkpoint",
           "export_checkpoint", "load_model", "check_out_dir", "RUN_FILES", "RUN_FORMAT", "DivergedError"]

RUN_FORMAT = "bip_fast.run/1"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RUN_FILES = (CHECKPOINT, METRICS, "config.yaml", "model.pt", "masks.pt", "results.json")
EXPORT_FILES = ("model_dense_format.pt", "masks.pt")


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """``epochs`` epochs of algorithm ``kind``; ``transition`` is applied to the previous
    segment's algorithm object on entry ("next_round", "finetune") instead of building a new one."""

    name: str
    kind: str
    epochs: int
    transition: Optional[str] = None
    round: Optional[int] = None

    def to_dict(self):
        return dict(name=self.name, kind=self.kind, epochs=self.epochs, transition=self.transition,
                    round=self.round)


def plan_segments(cfg: RunConfig) -> List[Segment]:
    """The segments of a (resolved) config's run; see the module docstring."""
    c, p, t = cfg.command, cfg.prune, cfg.train
    pre = p.pretrain_epochs if p.pretrain_epochs is not None else METHOD_DEFAULTS["dense"]["epochs"]
    if c == "pretrain":
        return [Segment("dense", "dense", t.epochs)]
    if c == "finetune":
        return [Segment("finetune", "dense", t.epochs)]
    if c != "prune":
        raise ValueError(f"command: {c!r} has no training plan")
    have = bool(cfg.model.pretrained)
    segs: List[Segment] = []
    if p.method == "imp":
        from ..pruning import IMP

        if (cfg.prune.structure or "global") != "global":
            raise ValueError(f"structure: IMP prunes by global magnitude only, got {cfg.prune.structure!r}")
        rounds = IMP.rounds_for(1.0 - p.sparsity, p.imp_rate)
        if not have:
            if p.rewind_epoch >= t.epochs:
                raise ValueError(f"rewind_epoch: must be < epochs ({t.epochs}) so that round 0 reaches the "
                                 f"rewind point, got {p.rewind_epoch}")
            segs.append(Segment("imp_round00", "imp", t.epochs, round=0))
        for r in range(1, rounds + 1):
            segs.append(Segment(f"imp_round{r:02d}", "imp", t.epochs, "next_round", round=r))
        return segs
    if not have and p.method not in baselines.AT_INIT:  # SNIP/GraSP/SynFlow prune the initialisation
        segs.append(Segment("pretrain", "dense", pre))
    if p.method in ("bip", "omp") + baselines.BASELINES:
        segs.append(Segment(p.method, p.method, t.epochs))
    elif p.method == "hydra":
        if p.hydra_score_epochs > 0:
            segs.append(Segment("hydra_prune", "hydra", p.hydra_score_epochs))
        segs.append(Segment("hydra_finetune", "hydra", t.epochs, "finetune"))
    else:
        raise ValueError(f"method: prune needs bip, imp, omp or hydra, got {p.method!r}")
    return segs


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return dev


def _dist_info():
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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    if present == ["config.yaml"]:  # a run that ended before its first checkpoint: nothing to lose
        present = []
    if present and not force:
        raise ValueError(f"out: '{out}' already holds a run ({', '.join(present)}); pass --resume to "
                         f"continue it or --force to overwrite it")
    return path


class _Forward:
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


def _resolve_model_path(path, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt", CHECKPOINT):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{what}: '{path}' holds neither model.pt nor {CHECKPOINT}")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: '{path}' does not exist")
    return p


def _read_model_file(path, what: str):
    """-> (state_dict, stored run config dict or None)."""
    p = _resolve_model_path(path, what)
    try:
        obj = ckpt.load(p)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    stored = None
    if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
        sd, stored = obj["model"], obj["config"]
        integrity.check_same_run(stored, p.parent, what, p)
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
                integrity.check_same_run(stored, p.parent, what, side)
        if stored is None and (p.parent / "config.yaml").is_file():
            try:
                stored = RunConfig.from_yaml(p.parent / "config.yaml").to_dict()
            except (ValueError, FileNotFoundError):
                stored = None
    else:
        raise ValueError(f"{what}: '{p}' is neither a bip_fast checkpoint nor a model state dict")
    return sd, stored


def _load_state_into(model: nn.Module, sd: Dict[str, torch.Tensor], what: str, src) -> nn.Module:
    from ..nn import masked_modules, sparsify

    if any(k.endswith(".mask") or k.endswith(".scores") for k in sd) and not masked_modules(model):
        model = sparsify(model)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:2])[:300]
        raise ValueError(f"{what}: '{src}' does not fit the model: {detail}") from None
    return model


def _strict_json(obj):
    """NaN/inf floats -> None, so every line stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


class DivergedError(ArithmeticError):
    """Training produced NaN/inf (see ``nonfinite_guard`` in bip_fast.pruning.base); the run stopped."""


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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


def _density(model: nn.Module) -> float:
    from ..nn import masked_modules

    mods = masked_modules(model)
    total = sum(m.mask.numel() for _, m in mods)
    if total == 0:
        return 1.0
    return float(sum(m.mask.sum() for _, m in mods)) / total


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Runs a ``pretrain``/``prune``/``finetune`` config (see the module docstring).

    ``config``: a :class:`RunConfig` (resolved here). ``dataset``: a ready
    :class:`bip_fast.engine.data.Dataset` (else loaded from the config). ``model_fn``: a callable
    returning a fresh plain model (else ``models.build(arch)``), e.g. for tiny test models.
    ``callbacks``: callables ``cb(trainer, record)`` run after each epoch, after the checkpoint
    and the metrics line are written (an exception there stops the run; the checkpoint stays).
    ``out=None`` in the config runs without writing anything (library use).
    """

    def __init__(self, config: RunConfig, *, dataset=None, model_fn: Optional[Callable[[], nn.Module]] = None,
                 callbacks: Sequence[Callable] = ()) -> None:
        if not isinstance(config, RunConfig):
            raise TypeError(f"config: expected a RunConfig, got {type(config).__name__}")
        self._resume_state = None
        if config.resume:
            # The run's own (resolved) config comes from its checkpoint; only the output folder,
            # the device, the progress display and the non-finite step budget may change on resume.
            if not config.out:
                raise ValueError("out: resume needs --out DIR holding checkpoint.pt")
            check_out_dir(config.out, True, False)
            state = ckpt.load(Path(config.out) / CHECKPOINT)
            if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
                raise ValueError(f"resume: '{Path(config.out) / CHECKPOINT}' is not a bip_fast run checkpoint")
            integrity.check_same_run(state["config"], config.out, "resume", Path(config.out) / CHECKPOINT)
            stored = RunConfig.from_dict(state["config"])
            stored.out, stored.resume = config.out, True
            stored.train.device, stored.train.progress = config.train.device, config.train.progress
            stored.train.nonfinite_skips = config.train.nonfinite_skips  # a policy of this session
            self._resume_state = state
            self.cfg = stored
        else:
            self.cfg = config.resolved()
        self.dataset = dataset
        self.model_fn = model_fn
        self.callbacks: List[Callable] = list(callbacks)
        self.rank, self.world = _dist_info()
        self.out = Path(self.cfg.out) if self.cfg.out else None
        self.history: List[Dict[str, Any]] = []
        self.rounds: List[Dict[str, Any]] = []
        self.alg = None
        self.inner: Optional[nn.Module] = None
        self.skipped_steps = 0  # non-finite steps skipped in this session

    # -- setup ----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _setup_device_and_data(self) -> None:
        cfg = self.cfg
        if self.world > 1 and cfg.train.device in ("auto", "cuda") and torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
        else:
            self.device = _device(cfg.train.device)
        if self.world > 1 and cfg.data.batch_size % self.world:
            raise ValueError(f"batch_size: the global batch {cfg.data.batch_size} must divide by the world "
                             f"size {self.world}")
        from . import data

        cl = cfg.data.channels_last
        bs, seed = cfg.data.batch_size, cfg.train.seed
        if cfg.data.dataset.lower() in imagefolder.FOLDER_DATASETS:
            if self.dataset is None:
                self.dataset = imagefolder.load_folder_dataset(cfg.data.dataset.lower(), cfg.data.data_dir)
            fd = self.dataset
            kw = dict(num_workers=cfg.data.workers, device=self.device, channels_last=cl)
            self.upper = fd.train_loader(bs, seed=seed, **kw)
            self.lower = fd.train_loader(bs, seed=seed + 1, **kw)
            self.bilevel = data.BilevelLoader(self.lower, self.upper)
            self.test_loader = fd.test_loader(cfg.data.test_batch_size, **kw)
            self.steps_per_epoch = len(self.upper)
            return
        if self.dataset is None:
            subset = tuple(cfg.data.subset) if cfg.data.subset is not None else None
            self.dataset = data.load_dataset(cfg.data.dataset, cfg.data.data_dir, device=self.device,
                                             subset=subset, seed=cfg.train.seed)
        else:
            ds = self.dataset
            self.dataset = data.Dataset(ds.train_x.to(self.device), ds.train_y.to(self.device),
                                        ds.test_x.to(self.device), ds.test_y.to(self.device),
                                        ds.num_classes, ds.mean, ds.std, ds.name)
        ds = self.dataset
        self.upper = data.Loader(ds.train_x, ds.train_y, bs, train=True, mean=ds.mean, std=ds.std,
                                 seed=seed, channels_last=cl)
        self.lower = data.Loader(ds.train_x, ds.train_y, bs, train=True, mean=ds.mean, std=ds.std,
                                 seed=seed + 1, channels_last=cl)
        self.bilevel = data.BilevelLoader(self.lower, self.upper)
        self.test_loader = data.eval_loader(ds.test_x, ds.test_y, cfg.data.test_batch_size, mean=ds.mean,
                                            std=ds.std, channels_last=cl)
        self.steps_per_epoch = len(self.upper)

    def _fresh_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        if self.model_fn is not None:
            model = self.model_fn()
        else:
            from .models import build

            model = build(self.cfg.model.arch, self.dataset.num_classes)
        return model

    def _place(self, model: nn.Module) -> nn.Module:
        if self.world > 1 and self.cfg.train.sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects
        model = model.to(self.device)
        if self.cfg.data.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _build_algorithm(self, seg: Segment):
        """A new algorithm of ``seg.kind`` around ``self.inner`` (sparsified first if masked)."""
        from ..nn import sparsify
        from ..pruning import get_algorithm

        cfg, p, t = self.cfg, self.cfg.prune, self.cfg.train
        total = seg.epochs * self.steps_per_epoch
        if seg.kind != "dense":
            self.inner = sparsify(self.inner)
            self.inner = self._place(self.inner)  # new score/mask tensors follow the device/format
        common = dict(momentum=t.momentum, total_steps=total)
        if seg.kind == "dense":
            if cfg.command == "prune":  # dense phase before pruning: the dense schedule
                kw = dict(lr=METHOD_DEFAULTS["dense"]["lr"], weight_decay=METHOD_DEFAULTS["dense"]["weight_decay"])
            else:
                kw = dict(lr=t.lr, weight_decay=t.weight_decay)
            alg = get_algorithm("dense")(self.inner, **kw, **common)
        elif seg.kind == "bip":
            alg = get_algorithm("bip")(
                self.inner, p.sparsity, structure=p.structure, schedule=p.schedule, variant=p.variant,
                lr=t.lr, score_lr=p.score_lr, weight_decay=t.weight_decay,
                score_weight_decay=p.score_weight_decay, gamma=p.gamma, lr2=p.lr2, score_init=p.score_init,
                n=p.nm_n, m=p.nm_m, **common)
        elif seg.kind == "omp":
            alg = get_algorithm("omp")(self.inner, p.sparsity, structure=p.structure, lr=t.lr,
                                       weight_decay=t.weight_decay, n=p.nm_n, m=p.nm_m, **common)
        elif seg.kind == "imp":
            rewind = 0 if cfg.model.pretrained else p.rewind_epoch * self.steps_per_epoch
            alg = get_algorithm("imp")(self.inner, rate=p.imp_rate, rewind_step=rewind, lr=t.lr,
                                       weight_decay=t.weight_decay, **common)
        elif seg.kind == "hydra":
            score_total = max(p.hydra_score_epochs, 1) * self.steps_per_epoch
            alg = get_algorithm("hydra")(
                self.inner, p.sparsity, structure=p.structure, score_lr=p.score_lr,
                score_weight_decay=p.score_weight_decay, lr=t.lr, weight_decay=t.weight_decay,
                momentum=t.momentum, total_steps=score_total, finetune_steps=t.epochs * self.steps_per_epoch,
                n=p.nm_n, m=p.nm_m)
        elif seg.kind in baselines.BASELINES:
            alg = baselines.build(seg.kind, self.inner, cfg, self.steps_per_epoch, common)
        else:
            raise ValueError(f"segment kind {seg.kind!r} unknown")
        self.inner = alg.model
        self._wrap(alg)
        return alg

    def _wrap(self, alg) -> None:
        """Route the algorithm's forward through DDP / torch.compile when asked."""
        fwd: Callable = self.inner
        if self.cfg.train.compile:
            fwd = torch.compile(self.inner)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = DDP(self.inner, device_ids=ids)
            if self.cfg.train.compile:
                ddp = torch.compile(ddp)
            fwd = ddp
        if fwd is not self.inner:
            alg.model = _Forward(fwd, self.inner)

    # -- checkpoint ----------------------------------------------------------------------
    def _state(self, seg_i: int, epoch: int) -> Dict[str, Any]:
        alg_sd = self.alg.state_dict(include_model=False)
        return {
            "format": RUN_FORMAT,
            "config": self.cfg.to_dict(),
            "plan": [s.to_dict() for s in self.segments],
            "segment": seg_i,
            "epoch": epoch,
            "global_epoch": self.global_epoch,
            "imp_round": getattr(self.alg, "round", None),
            "num_classes": self.dataset.num_classes,
            "model": _cpu_state(self.inner),
            "algorithm": alg_sd,
            "loaders": {"lower": self.lower.state_dict(), "upper": self.upper.state_dict()},
            "rng": ckpt.rng_state(),
            "history": list(self.history),
            "rounds": list(self.rounds),
            "best_acc": max((h["test_acc"] for h in self.history), default=None),
            "last_acc": self.history[-1]["test_acc"] if self.history else None,
            "world_size": self.world,
        }

    def _save(self, seg_i: int, epoch: int) -> None:
        if self.out is None or not self.is_main:
            return
        ckpt.save_atomic(self._state(seg_i, epoch), self.out / CHECKPOINT)
        lines = "".join(json.dumps(_strict_json(h), allow_nan=False) + "\n" for h in self.history)
        _write_text_atomic(self.out / METRICS, lines)

    # -- training -------------------------------------------------------------------------
    def _shard(self, batch):
        if self.world == 1:
            return batch
        x, y = batch
        per = x.shape[0] // self.world
        lo = self.rank * per
        return x[lo:lo + per], y[lo:lo + per]

    def _train_epoch(self, seg: Segment) -> Dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bilevel = seg.kind == "bip"
        it = self.bilevel if bilevel else self.upper
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        show = cfg.train.progress and self.is_main
        bar = tqdm(total=len(it), desc=f"{seg.name} {self.epoch_in_seg + 1}/{seg.epochs}", leave=False,
                   disable=None if show else True, dynamic_ncols=True)
        li = cfg.train.log_interval
        amp = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
        try:
            for i, batch in enumerate(it):
                with torch.autocast(**amp):
                    out = self._guarded_step(seg, batch, bilevel)
                if out is None:  # a non-finite step skipped (--nonfinite-skips)
                    bar.update(1)
                    continue
                cnt = out["count"].to(torch.float64)
                sums += torch.stack([out["loss"].detach().to(torch.float64) * cnt,
                                     out["correct"].to(torch.float64), cnt])
                bar.update(1)
                if (i + 1) % li == 0 and not bar.disable:
                    s = sums.tolist()  # the one host sync per log interval
                    bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.4f}", acc=f"{s[1] / max(s[2], 1):.4f}",
                                    density=f"{_density(self.inner):.4f}")
        finally:
            bar.close()
        if self.world > 1:
            dist.all_reduce(sums)
        s = sums.tolist()
        return {"train_loss": s[0] / max(s[2], 1.0), "train_acc": s[1] / max(s[2], 1.0)}

    def _guarded_step(self, seg: Segment, batch, bilevel: bool):
        """One algorithm step; a non-finite loss/gradient (no update applied) is skipped while
        ``nonfinite_skips`` allows, else the run stops with :class:`DivergedError`."""
        try:
            if bilevel:
                return self.alg.step(self._shard(batch[0]), self._shard(batch[1]))
            return self.alg.step(self._shard(batch))
        except NonFiniteError as e:
            self.skipped_steps += 1
            if self.skipped_steps <= getattr(self.cfg.train, "nonfinite_skips", 0):
                return None
            raise DivergedError(self._diverged_message(seg, f"step {e.step}: non-finite {e.what}")) from None

    def _diverged_message(self, seg: Segment, what: str) -> str:
        kept = (f"the last checkpoint ({self.out / CHECKPOINT}, epoch {self.global_epoch}) is kept"
                if self.out is not None and (self.out / CHECKPOINT).is_file() and self.history
                else "no checkpoint was written")
        return (f"diverged: {what} in epoch {self.epoch_in_seg + 1} of segment {seg.name!r}; no update "
                f"was applied and {kept}. Likely cause: a learning rate too high for this model (lr "
                f"{self.alg.current_lrs()}) or NaN/inf in the input data")

    def _check_weights_finite(self, seg: Segment) -> None:
        """Before a checkpoint: the last update of the epoch may have overflowed finite values."""
        ts = [v for v in self.inner.state_dict().values() if v.is_floating_point()]
        if ts and not bool(torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all()):
            raise DivergedError(self._diverged_message(seg, "the weights overflowed to inf/NaN"))

    def _enter(self, seg_i: int) -> None:
        seg = self.segments[seg_i]
        if seg.transition is not None and self.alg is not None and self.alg.name == seg.kind:
            if seg.transition == "next_round":
                self.alg.next_round()
            elif seg.transition == "finetune":
                self.alg.finetune(seg.epochs * self.steps_per_epoch)
            return
        self.alg = self._build_algorithm(seg)
        if seg.kind in baselines.AT_INIT:  # the one-shot cut (a resume restores it from the checkpoint)
            self.alg.prepare(baselines.score_batches(self.cfg, self.dataset, self.device))
        if seg.transition == "next_round":  # IMP from a pretrained model: round 1 right away
            self.alg.next_round()
        elif seg.transition == "finetune":  # Hydra without a score phase
            self.alg.finetune(seg.epochs * self.steps_per_epoch)

    def _segment_end(self, seg_i: int) -> None:
        """Outputs of a finished segment (idempotent: may rerun after a resume)."""
        seg = self.segments[seg_i]
        if seg.kind == "imp" and seg.round is not None and seg.round > 0:
            rec = {"round": seg.round, "density": _density(self.inner),
                   "test_acc": self.history[-1]["test_acc"] if self.history else None}
            self.rounds = [r for r in self.rounds if r["round"] != seg.round] + [rec]
            if self.out is not None and self.is_main:
                ckpt.save_atomic({"format": "bip_fast.round/1", **rec, "model": _cpu_state(self.inner)},
                                 self.out / f"round_{seg.round:02d}.pt")
        if self.out is not None and self.is_main and seg_i == len(self.segments) - 1:
            from ..masks import save_masks
            from ..nn import masked_modules

            ckpt.save_atomic(_cpu_state(self.inner), self.out / "model.pt")
            if masked_modules(self.inner):
                save_masks(self.inner, self.out / "masks.pt")

    def _resume(self) -> int:
        """Restore everything from ``out/checkpoint.pt``; returns the segment index."""
        state, self._resume_state = self._resume_state, None
        self.segments = [Segment(**s) for s in state["plan"]]
        seg_i, epoch = int(state["segment"]), int(state["epoch"])
        seg = self.segments[seg_i]
        self.inner = self._place(self._fresh_model())
        self.alg = self._build_algorithm(seg)
        self.inner.load_state_dict(state["model"])
        self.alg.load_state_dict(state["algorithm"])
        self.inner.load_state_dict(state["model"])
        self.lower.load_state_dict(state["loaders"]["lower"])
        self.upper.load_state_dict(state["loaders"]["upper"])
        ckpt.set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.rounds = list(state.get("rounds", []))
        self.global_epoch = int(state["global_epoch"])
        self.epoch_in_seg = epoch
        return seg_i

    def run(self) -> Dict[str, Any]:
        """Run (or resume) the whole plan; returns the results dict (also ``results.json``)."""
        cfg = self.cfg
        if cfg.command not in ("pretrain", "prune", "finetune"):
            raise ValueError(f"command: Trainer runs pretrain, prune or finetune, got {cfg.command!r}")
        if self.out is None or not self.is_main:
            return self._run()
        with RunLock(self.out, cfg.command):  # one run per folder; also the writability check
            return self._run()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.out is not None:
            check_out_dir(self.out, cfg.resume, cfg.force)
        if self.world > 1:
            dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if not cfg.resume:  # fail on a missing input file before loading any data
            if cfg.command == "finetune":
                _resolve_model_path(cfg.checkpoint, "checkpoint")
            elif cfg.model.pretrained:
                _resolve_model_path(cfg.model.pretrained, "pretrained")
        self._setup_device_and_data()
        t_start = time.perf_counter()
        if cfg.resume:
            seg_i = self._resume()
        else:
            self.segments = plan_segments(cfg)
            self.global_epoch = 0
            self.epoch_in_seg = 0
            model = self._fresh_model()
            if cfg.command == "finetune":
                sd, _ = _read_model_file(cfg.checkpoint, "checkpoint")
                model = _load_state_into(model, sd, "checkpoint", cfg.checkpoint)
            elif cfg.model.pretrained:
                sd, _ = _read_model_file(cfg.model.pretrained, "pretrained")
                model = _load_state_into(model, sd, "pretrained", cfg.model.pretrained)
            if cfg.command == "prune" and cfg.prune.structure == "nm":
                integrity.check_nm_layers(model, cfg.prune.nm_n, cfg.prune.nm_m)
            self.inner = self._place(model)
            seg_i = 0
            self._enter(0)  # builds (and validates) the first algorithm before the folder is touched
            if self.out is not None and self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                _write_text_atomic(self.out / "config.yaml", cfg.to_yaml())
                # --force: every file of the old run goes, so no old checkpoint.pt sits beside the
                # new config.yaml if this run stops before its first checkpoint
                stale = [self.out / f for f in (CHECKPOINT, METRICS, "results.json", "model.pt", "masks.pt")]
                for f in stale + sorted(self.out.glob("round_*.pt")):
                    if f.exists():
                        f.unlink()

        while seg_i < len(self.segments):
            seg = self.segments[seg_i]
            while self.epoch_in_seg < seg.epochs:
                t0 = time.perf_counter()
                rec = self._train_epoch(seg)
                train_s = time.perf_counter() - t0
                test_acc = evaluate(self.inner, self.test_loader, bf16=cfg.train.bf16)
                self.epoch_in_seg += 1
                self.global_epoch += 1
                record = {"epoch": self.global_epoch, "segment": seg.name, "segment_epoch": self.epoch_in_seg,
                          "round": seg.round, **rec, "test_acc": test_acc, "density": _density(self.inner),
                          "lr": self.alg.current_lrs(), "seconds": train_s}
                if self.skipped_steps:
                    record["skipped_steps"] = self.skipped_steps
                self._check_weights_finite(seg)
                self.history.append(record)
                self._save(seg_i, self.epoch_in_seg)
                for cb in self.callbacks:
                    cb(self, record)
            self._segment_end(seg_i)
            seg_i += 1
            if seg_i < len(self.segments):
                self.epoch_in_seg = 0
                self._enter(seg_i)

        rep = self.results(time.perf_counter() - t_start)
        if self.out is not None and self.is_main:
            _write_text_atomic(self.out / "results.json", json.dumps(_strict_json(rep), indent=1, allow_nan=False) + "\n")
        return rep

    def results(self, seconds: float = 0.0) -> Dict[str, Any]:
        from ..nn import sparsity_report

        rep = sparsity_report(self.inner)
        return {
            "command": self.cfg.command, "method": self.cfg.prune.method, "arch": self.cfg.model.arch,
            "test_acc": self.history[-1]["test_acc"] if self.history else None,
            "best_acc": max((h["test_acc"] for h in self.history), default=None),
            "density": rep["density"], "sparsity": rep["sparsity"], "prunable": rep["numel"],
            "kept": rep["kept"], "epochs": self.global_epoch, "rounds": self.rounds,
            "seconds_this_session": seconds,
        }

    @property
    def model(self) -> nn.Module:
        """The plain (unwrapped) model being trained."""
        return self.inner


# --------------------------------------------------------------------------------------------
# eval / export
# --------------------------------------------------------------------------------------------

def load_model(path, cfg: RunConfig, num_classes: int, what: str = "checkpoint") -> nn.Module:
    """A model (masked if the file holds masks) from a model.pt / checkpoint.pt / run folder. The
    architecture is the one recorded with the file when there is a record, else ``cfg``'s."""
    from .models import build

    sd, stored = _read_model_file(path, what)
    arch = stored["model"]["arch"] if stored else cfg.model.arch
    model = build(arch, num_classes)
    return _load_state_into(model, sd, what, path)


def _num_classes(sd: Dict[str, torch.Tensor], stored) -> int:
    if stored and stored.get("data", {}).get("dataset", "cifar10").lower().replace("-", "") == "cifar100":
        return 100
    key = [k for k in sd if k.endswith(".weight") and sd[k].dim() == 2]
    return int(sd[key[-1]].shape[0]) if key else 10


def evaluate_checkpoint(cfg: RunConfig) -> Dict[str, Any]:
    """Test accuracy and sparsity of ``cfg.checkpoint`` on ``cfg``'s dataset / subset."""
    from . import data
    from ..nn import sparsity_report

    sd, stored = _read_model_file(cfg.checkpoint, "checkpoint")  # fail before loading data
    model = load_model(cfg.checkpoint, cfg, _num_classes(sd, stored))
    dev = _device(cfg.train.device)
    if cfg.data.dataset.lower() in imagefolder.FOLDER_DATASETS:
        fd = imagefolder.load_folder_dataset(cfg.data.dataset.lower(), cfg.data.data_dir)
        loader = fd.test_loader(cfg.data.test_batch_size, num_workers=cfg.data.workers, device=dev)
        n_test = len(fd.test_samples)
    else:
        subset = tuple(cfg.data.subset) if cfg.data.subset is not None else None
        ds = data.load_dataset(cfg.data.dataset, cfg.data.data_dir, device=dev, subset=subset, seed=cfg.train.seed)
        loader, n_test = ds.test_loader(cfg.data.test_batch_size), int(ds.test_y.numel())
    model = model.to(dev)
    acc = evaluate(model, loader, bf16=cfg.train.bf16)
    rep = sparsity_report(model)
    return {"test_acc": acc, "density": rep["density"], "sparsity": rep["sparsity"], "prunable": rep["numel"],
            "kept": rep["kept"], "test_samples": n_test}


def export_checkpoint(cfg: RunConfig, num_classes: Optional[int] = None) -> Dict[str, str]:
    """Write ``model_dense_format.pt`` (state dict of the finalize()d plain model: masked weights
    zeroed, loadable into ``models.build(arch)``) and ``masks.pt`` (``bip_fast.masks.save_masks``)."""
    from ..masks import save_masks
    from ..nn import finalize, masked_modules, sparsify

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: '{cfg.out}' exists and is not a directory")
    present = [f for f in EXPORT_FILES if (out / f).exists()]
    if present and not cfg.force:
        raise ValueError(f"out: '{cfg.out}' already holds {', '.join(present)}; pass --force to overwrite")
    sd, stored = _read_model_file(cfg.checkpoint, "checkpoint")
    if num_classes is None:
        num_classes = _num_classes(sd, stored)
    model = load_model(cfg.checkpoint, cfg, num_classes)
    if not masked_modules(model):
        model = sparsify(model)  # a dense model: all-True masks
    out.mkdir(parents=True, exist_ok=True)
    save_masks(model, out / "masks.pt")
    plain = finalize(copy.deepcopy(model))
    ckpt.save_atomic(_cpu_state(plain), out / "model_dense_format.pt")
    return {"model": str(out / "model_dense_format.pt"), "masks": str(out / "masks.pt")}
