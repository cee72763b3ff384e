"""The training loop: one :class:`Trainer` runs any pruning algorithm epoch by epoch.

A run (``pretrain``, ``prune`` or ``finetune``) is planned as a list of *segments*, each a number
of epochs of one algorithm; :mod:`.plan` describes each command's segments and the files they
leave (``model.pt``, ``rewind.pt``, ``round_RR.pt``).

Per epoch: the algorithm's ``step`` over the training loader (for BiP a :class:`BilevelLoader`: lower
batch for the weight step, upper batch for the score step; an epoch is one pass of the upper loader),
metrics accumulated on the device (one host sync per ``log_interval`` steps, no extra forward for
logging); evaluation on the test split (eval mode, no grad); one line in ``metrics.jsonl`` (and
TensorBoard events, :mod:`.tblog`); an atomic ``checkpoint.pt`` holding everything needed to continue
exactly (model, algorithm state with optimisers / schedule / masks / IMP round / Hydra phase / rewind
state, both loaders' states, RNG states, segment and epoch, history, config). ``resume=True``
continues from it; the resumed run ends bit-identical to an uninterrupted one (same device and
software). Checkpoints are taken at epoch ends only. Distributed runs (torchrun): see :mod:`.setup`.

Not implemented: CUDA-graph capture of the iteration (documented option of the project brief);
``compile=True`` uses ``torch.compile`` on the forward instead.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..files import checkpoint as ckpt
from ..files.runlock import RunLock
from ..masks import save_masks
from ..models import build
from ..nn import masked_modules, sparsity_report, to_sync_norms
from ..pruning.base import NonFiniteError
from . import baselines, tblog
from .checks import check_nm_layers, check_same_run
from .evaluation import density, evaluate, mask_state
from .hparams import RunConfig
from .plan import Segment, describe_plan, plan_segments
from .rundir import (CHECKPOINT, METRICS, REWIND, REWIND_FORMAT, RUN_FORMAT, check_out_dir, cpu_state,
                     load_state_into, read_model_file, read_rewind_file, resolve_model_path, strict_json)
from .setup import build_algorithm, dist_info, make_loaders, resolve_device, wrap_forward

__all__ = ["Trainer", "DivergedError"]


class DivergedError(ArithmeticError):
    """Training produced NaN/inf (see ``nonfinite_guard`` in bip_fast.pruning.base); the run stopped."""


class Trainer:
    """Runs a ``pretrain``/``prune``/``finetune`` config (see the module docstring).

    ``config``: a :class:`RunConfig` (resolved here). ``dataset``: a ready
    :class:`bip_fast.data.Dataset` (else loaded from the config). ``model_fn``: a callable
    returning a fresh plain model (else ``models.build(arch)``), e.g. for tiny test models.
    ``callbacks``: callables ``cb(trainer, record)`` run after each epoch, after the checkpoint
    and the metrics line are written (an exception there stops the run; the checkpoint stays).
    ``out=None`` in the config runs without writing anything (library use).
    ``announce``: called (on rank 0) with the plan line (:func:`~bip_fast.engine.plan.describe_plan`:
    every segment's epochs and steps) once the run is set up, before its first step; the CLI
    prints it. The line is also :attr:`plan_text`.
    """

    def __init__(self, config: RunConfig, *, dataset=None, model_fn: Optional[Callable[[], nn.Module]] = None,
                 callbacks: Sequence[Callable] = (), announce: Optional[Callable[[str], None]] = None) -> None:
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
            check_same_run(state["config"], config.out, "resume", Path(config.out) / CHECKPOINT)
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
        self.announce = announce
        self.plan_text: Optional[str] = None
        self.rank, self.world = dist_info()
        self.out = Path(self.cfg.out) if self.cfg.out else None
        self.tb = tblog.EventMirror(self.cfg.train.tensorboard, self.out)  # checks the package up front
        self.history: List[Dict[str, Any]] = []
        self.rounds: List[Dict[str, Any]] = []
        self.alg = None
        self.inner: Optional[nn.Module] = None
        self.skipped_steps = self._skips_base = 0  # non-finite steps skipped in this session
        self._rewind_weights = None  # IMP from --pretrained: the pretrained run's rewind.pt

    # -- setup ----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _setup_device_and_data(self) -> None:
        cfg = self.cfg
        if self.world > 1 and cfg.train.device in ("auto", "cuda") and torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
        else:
            self.device = resolve_device(cfg.train.device)
        if self.world > 1 and cfg.data.batch_size % self.world:
            raise ValueError(f"batch_size: the global batch {cfg.data.batch_size} must divide by the world "
                             f"size {self.world}")
        ld = make_loaders(cfg, self.dataset, self.device)
        self.dataset, self.upper, self.lower, self.bilevel = ld.dataset, ld.upper, ld.lower, ld.bilevel
        self.test_loader, self.steps_per_epoch = ld.test, ld.steps_per_epoch

    def _fresh_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        if self.model_fn is not None:
            return self.model_fn()
        return build(self.cfg.model.arch, self.dataset.num_classes)

    def _place(self, model: nn.Module) -> nn.Module:
        if self.world > 1 and self.cfg.train.sync_bn and self.device.type == "cuda":
            model = to_sync_norms(model)  # keeps the Parameter objects and the channel masks
        model = model.to(self.device)
        if self.cfg.data.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _build_algorithm(self, seg: Segment):
        """A new algorithm of ``seg.kind`` around ``self.inner`` (sparsified first if masked)."""
        alg = build_algorithm(seg, self.cfg, self.inner, self.steps_per_epoch, self._place)
        self._skips_base = self.skipped_steps  # the session's budget spans every algorithm object
        alg.nonfinite.limit = max(0, getattr(self.cfg.train, "nonfinite_skips", 0) - self.skipped_steps)
        self.inner = alg.model
        wrap_forward(alg, self.inner, self.cfg, self.world, self.device)
        return alg

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
            "model": cpu_state(self.inner),
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
        self.tb.write(self.history)  # before the checkpoint: a resume purges the epochs it replays
        ckpt.save_atomic(self._state(seg_i, epoch), self.out / CHECKPOINT)
        lines = "".join(json.dumps(strict_json(h), allow_nan=False) + "\n" for h in self.history)
        ckpt.write_text_atomic(self.out / METRICS, lines)

    # -- training -------------------------------------------------------------------------
    def _shard(self, batch):
        if self.world == 1:
            return batch
        x, y = batch
        per = x.shape[0] // self.world
        lo = self.rank * per
        return x[lo:lo + per], y[lo:lo + per]

    def _train_epoch(self, seg: Segment) -> Dict[str, float]:
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
                cnt = out["count"].to(torch.float64)
                vec = torch.stack([out["loss"].detach().to(torch.float64) * cnt, out["correct"].to(torch.float64), cnt])
                sums += torch.where(out["skipped"], 0.0, vec)  # a skipped step (no update) is not counted
                bar.update(1)
                if (i + 1) % li == 0 and not bar.disable:
                    s = sums.tolist()  # the one host sync per log interval
                    bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.4f}", acc=f"{s[1] / max(s[2], 1):.4f}",
                                    density=f"{density(self.inner):.4f}")
        finally:
            bar.close()
        self._guarded(seg, self._read_guard)  # the epoch's last read of the non-finite flag
        if self.world > 1:
            dist.all_reduce(sums)
        s = sums.tolist()
        return {"train_loss": s[0] / max(s[2], 1.0), "train_acc": s[1] / max(s[2], 1.0)}

    def _guarded_step(self, seg: Segment, batch, bilevel: bool):
        """One algorithm step. Non-finite steps apply no update (decided on the device) and are
        skipped while ``nonfinite_skips`` allows; over that budget the run stops with
        :class:`DivergedError`."""
        if bilevel:
            return self._guarded(seg, self.alg.step, self._shard(batch[0]), self._shard(batch[1]))
        return self._guarded(seg, self.alg.step, self._shard(batch))

    def _read_guard(self) -> None:
        """Host read of the algorithm's non-finite flag: counts the skipped steps."""
        self.skipped_steps = self._skips_base + self.alg._check_nonfinite()

    def _guarded(self, seg: Segment, fn, *args):
        """``fn(*args)``, with the guard's NonFiniteError turned into the run's DivergedError."""
        try:
            return fn(*args)
        except NonFiniteError as e:
            many = f" ({e.count} non-finite steps, {e.limit} allowed)" if e.limit else ""
            raise DivergedError(self._diverged_message(seg, f"step {e.step}: non-finite {e.what}{many}")) from None

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
        if seg.kind == "imp" and self._rewind_weights is not None:
            self.alg.set_rewind_state(self._rewind_weights)  # before round 1 prunes and rewinds
            self._rewind_weights = None
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
            rec = {"round": seg.round, "density": density(self.inner),
                   "test_acc": self.history[-1]["test_acc"] if self.history else None}
            self.rounds = [r for r in self.rounds if r["round"] != seg.round] + [rec]
            if self.out is not None and self.is_main:
                ckpt.save_atomic({"format": "bip_fast.round/1", **rec, "model": cpu_state(self.inner)},
                                 self.out / f"round_{seg.round:02d}.pt")
        if self.out is not None and self.is_main and seg_i == len(self.segments) - 1:
            ckpt.save_atomic(cpu_state(self.inner), self.out / "model.pt")
            if masked_modules(self.inner):
                save_masks(self.inner, self.out / "masks.pt")

    def _keep_rewind_weights(self) -> None:
        """pretrain: the state at the start of epoch ``--rewind-epoch``, in ``rewind.pt`` (for
        ``prune --method imp --pretrained``; rewritten unchanged if a resume starts at that epoch)."""
        cfg = self.cfg
        if (cfg.command != "pretrain" or cfg.prune.rewind_epoch != self.epoch_in_seg or self.out is None
                or not self.is_main):
            return
        ckpt.save_atomic({"format": REWIND_FORMAT, "epoch": self.epoch_in_seg,
                          "step": self.epoch_in_seg * self.steps_per_epoch, "config": cfg.to_dict(),
                          "model": cpu_state(self.inner)}, self.out / REWIND)

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
        with RunLock(self.out, cfg.command), self.tb:  # one run per folder (also the writability check)
            return self._run()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.out is not None:
            check_out_dir(self.out, cfg.resume, cfg.force)
        if self.world > 1:
            dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if not cfg.resume:  # fail on a missing input file before loading any data
            if cfg.command == "finetune":
                resolve_model_path(cfg.checkpoint, "checkpoint")
            elif cfg.model.pretrained:
                resolve_model_path(cfg.model.pretrained, "pretrained")
                p = cfg.prune
                if cfg.command == "prune" and p.method == "imp" and not p.rewind_to_pretrained:
                    self._rewind_weights, p.rewind_epoch = read_rewind_file(cfg.model.pretrained, p.rewind_epoch)
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
                sd, _ = read_model_file(cfg.checkpoint, "checkpoint")
                model = load_state_into(model, sd, "checkpoint", cfg.checkpoint)
            elif cfg.model.pretrained:
                sd, _ = read_model_file(cfg.model.pretrained, "pretrained")
                model = load_state_into(model, sd, "pretrained", cfg.model.pretrained)
            if cfg.command == "prune" and cfg.prune.structure == "nm":
                check_nm_layers(model, cfg.prune.nm_n, cfg.prune.nm_m, cfg.prune.include, cfg.prune.exclude)
            self.inner = self._place(model)
            seg_i = 0
            self._enter(0)  # builds (and validates) the first algorithm before the folder is touched
            if self.out is not None and self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                ckpt.write_text_atomic(self.out / "config.yaml", cfg.to_yaml())
                # --force: every file of the old run goes, so no old checkpoint.pt sits beside the
                # new config.yaml if this run stops before its first checkpoint
                stale = [self.out / f for f in (CHECKPOINT, METRICS, "results.json", "model.pt", "masks.pt", REWIND)]
                for f in stale + sorted(self.out.glob("round_*.pt")):
                    if f.exists():
                        f.unlink()

        self.plan_text = describe_plan(cfg, self.segments, self.steps_per_epoch, seg_i, self.epoch_in_seg)
        if self.announce is not None and self.is_main:
            self.announce(self.plan_text)
        while seg_i < len(self.segments):
            seg = self.segments[seg_i]
            while self.epoch_in_seg < seg.epochs:
                self._keep_rewind_weights()
                t0 = time.perf_counter()
                rec = self._train_epoch(seg)
                train_s = time.perf_counter() - t0
                test_acc = evaluate(self.inner, self.test_loader, bf16=cfg.train.bf16)
                self.epoch_in_seg += 1
                self.global_epoch += 1
                masks = mask_state(self.inner, self.alg.collapse.warned)  # one warning per collapsed layer
                record = {"epoch": self.global_epoch, "segment": seg.name, "segment_epoch": self.epoch_in_seg,
                          "round": seg.round, **rec, "test_acc": test_acc, **masks,
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
            ckpt.write_text_atomic(self.out / "results.json", json.dumps(strict_json(rep), indent=1, allow_nan=False) + "\n")
        return rep

    def results(self, seconds: float = 0.0) -> Dict[str, Any]:
        rep = sparsity_report(self.inner)
        return {
            "command": self.cfg.command, "method": self.cfg.prune.method, "arch": self.cfg.model.arch,
            "test_acc": self.history[-1]["test_acc"] if self.history else None,
            "best_acc": max((h["test_acc"] for h in self.history), default=None),
            "density": rep["density"], "sparsity": rep["sparsity"], "prunable": rep["numel"],
            "kept": rep["kept"], "empty_layers": rep["empty_layers"], "epochs": self.global_epoch, "rounds": self.rounds,
            "seconds_this_session": seconds,
        }

    @property
    def model(self) -> nn.Module:
        """The plain (unwrapped) model being trained."""
        return self.inner
