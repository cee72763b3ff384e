"""The training loop of ``benchmarks/speedup.py``: the run context (schedule lengths in steps, the
--max-minutes deadline), timed training steps, evaluation, and the generic resumable run: a list
of segments, checkpointed at epoch boundaries, whose result is saved to runs/<run>.json."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

try:  # imported as part of a package (python -m benchmarks.speedup)
    from . import _common as C
    from ._speedup_presets import BIP_FRACTION, HYDRA_FINETUNE_FRACTION, HYDRA_SCORE_FRACTION, REWIND_FRACTION
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_presets import (  # type: ignore[no-redef]
        BIP_FRACTION, HYDRA_FINETUNE_FRACTION, HYDRA_SCORE_FRACTION, REWIND_FRACTION)

from bip_fast.data import BilevelLoader
from bip_fast.files import checkpoint as ckpt
from bip_fast.masks import kept_units
from bip_fast.models import CifarResNet, build


class Stop(Exception):
    """The --max-minutes budget ran out, or SIGINT / SIGTERM arrived; state is saved, a rerun with
    --resume continues."""


# --------------------------------------------------------------------------------------------
# context
# --------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, args, cfg: Dict[str, Any], device: torch.device, data) -> None:
        self.args, self.cfg, self.device, self.data = args, cfg, device, data
        self.out = args.out
        self.runs_dir = os.path.join(self.out, "runs")
        self.ckpt_dir = os.path.join(self.out, "ckpt")
        self.deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
        spe = cfg["train_samples"] // cfg["batch_size"]
        self.steps_per_epoch = spe
        D = cfg["dense_epochs"] * spe
        self.D = D
        self.steps = {
            "dense": D,
            "imp_round": D,
            "bip": max(1, round(BIP_FRACTION * D)),
            "omp": D,
            "hydra_score": max(1, round(HYDRA_SCORE_FRACTION * D)),
            "hydra_finetune": max(1, round(HYDRA_FINETUNE_FRACTION * D)),
            "rewind": max(1, round(REWIND_FRACTION * D)),
        }
        self.warmed: set = set()
        self.code = code_version()
        self.chosen: Dict[str, Dict[str, Any]] = {}  # tuned method -> its chosen configuration
        self.calibration: Optional[Dict[str, Any]] = None
        self.signalled: Optional[int] = None  # the first SIGINT / SIGTERM received (stop_on_signals)

    def out_of_time(self) -> bool:
        return self.signalled is not None or (self.deadline is not None and time.monotonic() > self.deadline)

    def stop_reason(self) -> str:
        """Why a run stopped early, for the closing message."""
        if self.signalled is not None:
            return f"stopped by {signal.Signals(self.signalled).name}"
        return f"stopped after --max-minutes {self.args.max_minutes:g}"

    def exit_status(self) -> int:
        """0, or 128 + the signal's number when a signal stopped the run (the shell's convention)."""
        return 0 if self.signalled is None else 128 + self.signalled


@contextlib.contextmanager
def stop_on_signals(ctx: Ctx) -> Iterator[None]:
    """Within the block, the first SIGINT (Ctrl-C) or SIGTERM stops the benchmark the way
    --max-minutes does: the current epoch finishes, its checkpoint is saved and the results file is
    written, so nothing finished is lost and --resume continues. A second signal interrupts at once
    (checkpoints are written atomically, so the last saved one stays whole). The previous handlers
    come back on leaving; where signals cannot be handled (not the main thread) nothing changes."""

    def handler(signum, frame):
        if ctx.signalled is not None:
            raise KeyboardInterrupt
        ctx.signalled = signum
        print(f"\n[stop] {signal.Signals(signum).name}: stopping at the next epoch boundary; the results file "
              f"will be written (send it again to interrupt at once)", file=sys.stderr, flush=True)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def code_version() -> Dict[str, Any]:
    """{"commit", "dirty"} of the code: changes under benchmarks/results/ (the results being
    written) do not make the tree dirty."""
    return C.git_commit(exclude=("benchmarks/results",))


def _build(arch: str) -> torch.nn.Module:
    if arch == "resnet8":  # the engine's CIFAR ResNet at depth 8 (6n+2, n=1): the quick preset's size
        return CifarResNet(8)
    if arch == "resnet8b":  # the same with 1x1-conv projection shortcuts (benchmarks/macs_budget.py)
        return CifarResNet(8, shortcut="B")
    return build(arch)


def _batches(loader) -> Iterator:
    while True:
        for b in loader:
            yield b


def _loader(ctx: Ctx, seed: int, bilevel: bool):
    d, bs = ctx.data, ctx.cfg["batch_size"]
    aug = ctx.cfg.get("augment", True)
    lower = d.train_loader(bs, seed=1000 * seed + 1, augment=aug)
    if not bilevel:
        return lower
    return BilevelLoader(lower, d.train_loader(bs, seed=1000 * seed + 2, augment=aug))


@torch.no_grad()
def _accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum()
        n += y.shape[0]
    return float(correct) / n


@torch.no_grad()
def evaluate(model: torch.nn.Module, ctx: Ctx, test: bool = True) -> Dict[str, float]:
    """{"test_acc"} (unless ``test`` is false) and, where the preset holds out a validation split,
    {"val_acc"}: the validation accuracy decides, the test accuracy only reports."""
    was = model.training
    model.eval()
    out = {"test_acc": _accuracy(model, ctx.data.test_loader(500), ctx.device)} if test else {}
    if ctx.data.val_x is not None:
        out["val_acc"] = _accuracy(model, ctx.data.val_loader(500), ctx.device)
    model.train(was)
    return out


def _timed_steps(alg, batches, n: int, bilevel: bool, device: torch.device) -> float:
    """Run ``n`` training steps; seconds of wall-clock with the device synchronised at both ends."""
    C.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(batches)
        if bilevel:
            alg.step(b[0], b[1])
        else:
            alg.step(b)
    C.synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# generic resumable run: a list of segments (steps of one phase), each with enter / end hooks
# --------------------------------------------------------------------------------------------
class Segment:
    def __init__(self, name: str, steps: int, enter: Optional[Callable] = None, end: Optional[Callable] = None):
        self.name, self.steps, self.enter, self.end = name, steps, enter, end


def _run_path(ctx: Ctx, run_id: str) -> str:
    return os.path.join(ctx.runs_dir, f"{run_id}.json")


def eval_points(total: int, n: Optional[int]) -> List[int]:
    """``n`` evaluation steps evenly spread over a schedule of ``total`` steps (the last = ``total``)."""
    if not n:
        return [total]
    return sorted({max(1, round(total * (i + 1) / n)) for i in range(n)})


class MixedCode(Exception):
    """A run, checkpoint or cached model was made by another version of the code."""


def check_code(ctx: Ctx, code: Optional[Dict[str, Any]], what: str) -> None:
    """Refuse to continue from or reuse ``what`` made at another commit (or from a dirty tree)
    unless ``--allow-mixed-commits``: the results of one benchmark come from one version."""
    if getattr(ctx.args, "allow_mixed_commits", False) or code == ctx.code:
        return
    raise MixedCode(f"{what} was made by code {code or 'of unknown version'}, this is {ctx.code}; rerun "
                    f"without --resume (or with another --out), or pass --allow-mixed-commits to mix them")


def execute(ctx: Ctx, run_id: str, alg, segments: List[Segment], seed: int, bilevel: bool,
            extra: Optional[Dict[str, Any]] = None, eval_at: Sequence[int] = (),
            until: Optional[int] = None, track_masks: int = 0) -> Dict[str, Any]:
    """Train ``alg`` through ``segments`` (resumable); returns {"train_seconds", "records", "curve", ...}.

    ``eval_at``: step counts (over all segments) after which the model is evaluated (validation
    and test splits); each evaluation appends {"step", "train_seconds", "test_acc", "val_acc"}
    to ``state["curve"]`` (evaluation time is not training time). ``until``: stop after that many
    segments, keeping the checkpoint, so that a later call with the same ``run_id`` continues
    (IMP's tuning runs its first rounds; the chosen configuration goes on from there).
    ``track_masks``: split the schedule into that many equal parts and record, at the end of each,
    the fraction of output filters (and of mask entries) whose kept state differs from the end of
    the part before (``state["mask_flips"]``; the first part against the mask the first step
    starts from). Net changes: a filter that leaves and comes back within one part counts 0."""
    ck_path = os.path.join(ctx.ckpt_dir, f"{run_id}.pt")
    loader = _loader(ctx, seed, bilevel)
    state = {"seg": 0, "seg_step": 0, "step": 0, "train_seconds": 0.0, "records": [], "curve": [],
             "extra": extra or {}, "code": ctx.code}
    if os.path.exists(ck_path):
        saved = ckpt.load(ck_path, map_location=ctx.device)
        check_code(ctx, saved["state"].get("code"), f"checkpoint {ck_path}")
        alg.load_state_dict(saved["alg"])
        loader.load_state_dict(saved["loader"])
        state = saved["state"]
        C.log(f"[speedup] {run_id}: resumed at segment {state['seg']} step {state['seg_step']}")
    batches = _batches(loader)
    pending = sorted(set(int(e) for e in eval_at))
    total = sum(sg.steps for sg in segments)
    marks = sorted({max(1, round(total * (i + 1) / track_masks)) for i in range(track_masks)}) if track_masks else []
    if marks:
        state.setdefault("mask_flips", {"steps": marks, "filters": [], "entries": [], "prev": None})

    def save():
        ckpt.save_atomic({"alg": alg.state_dict(), "loader": loader.state_dict(), "state": state}, ck_path)

    stop_at = len(segments) if until is None else min(until, len(segments))
    while state["seg"] < stop_at:
        seg = segments[state["seg"]]
        if state["seg_step"] == 0 and seg.enter is not None:
            seg.enter(alg, state)
        while state["seg_step"] < seg.steps:
            n = min(ctx.steps_per_epoch, seg.steps - state["seg_step"])
            nxt = min((e for e in pending + marks if e > state["step"]), default=None)
            if nxt is not None:
                n = min(n, nxt - state["step"])
            if marks and state["mask_flips"]["prev"] is None:
                state["mask_flips"]["prev"] = [m.detach().clone() for m in alg.masks()]
            state["train_seconds"] += _timed_steps(alg, batches, n, bilevel, ctx.device)
            state["seg_step"] += n
            state["step"] += n
            if state["step"] in marks:
                _record_flips(state["mask_flips"], alg.masks())
            if state["step"] in pending:
                state["curve"].append({"step": state["step"], "train_seconds": state["train_seconds"],
                                       **evaluate(alg.model, ctx)})
            if state["seg_step"] < seg.steps:
                save()
                if ctx.out_of_time():
                    raise Stop(run_id)
        if seg.end is not None:
            seg.end(alg, state)
        state["seg"] += 1
        state["seg_step"] = 0
        if state["seg"] < len(segments):
            save()
            if state["seg"] < stop_at and ctx.out_of_time():
                raise Stop(run_id)
    if state["seg"] == len(segments) and os.path.exists(ck_path):
        os.remove(ck_path)
    return state


def _record_flips(track: Dict[str, Any], masks: List[torch.Tensor]) -> None:
    """Append the fraction of output filters and of mask entries whose kept state changed since
    ``track["prev"]`` (a filter is kept while any of its entries is), then make ``masks`` the new
    reference."""
    prev = track["prev"]
    rows = [kept_units(m) for m in masks]
    rows0 = [kept_units(m) for m in prev]
    track["filters"].append(sum(int((a != b).sum()) for a, b in zip(rows, rows0)) / max(1, sum(r.numel() for r in rows)))
    track["entries"].append(sum(int((a.bool() != b.bool()).sum()) for a, b in zip(masks, prev))
                            / max(1, sum(m.numel() for m in masks)))
    track["prev"] = [m.detach().clone() for m in masks]


def _warmup(ctx: Ctx, key: str, make: Callable[[], Any], bilevel: bool) -> None:
    """A few untimed steps of a throwaway instance (allocator, cuDNN, Triton compilation)."""
    if key in ctx.warmed:
        return
    alg = make()
    loader = _loader(ctx, 999, bilevel)
    _timed_steps(alg, _batches(loader), 3, bilevel, ctx.device)
    ctx.warmed.add(key)
    del alg


def _save_result(ctx: Ctx, run_id: str, result: Dict[str, Any]) -> None:
    """runs/<run_id>.json, atomically, with the code version (commit, dirty) that made it."""
    result["code"] = ctx.code
    os.makedirs(ctx.runs_dir, exist_ok=True)
    tmp = _run_path(ctx, run_id) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, _run_path(ctx, run_id))


def _load_result(ctx: Ctx, run_id: str) -> Optional[Dict[str, Any]]:
    p = _run_path(ctx, run_id)
    if os.path.exists(p):
        with open(p) as f:
            done = json.load(f)
        check_code(ctx, done.get("code"), f"run {p}")
        return done
    return None
