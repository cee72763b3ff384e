"""Headline benchmark: end-to-end training time and accuracy of BiP vs IMP (and OMP, Hydra).

All methods run on the same engine (bip_fast.pruning algorithms, the same kernels, the same
device-resident CIFAR-10 loaders, the same device) and start from the same dense pretrained model
(cached between runs in the cache dir, keyed by a hash of its config). Targets are points of the
paper's IMP sparsity series (SPEC §5): 48.8% (0.8^3), 73.8% (0.8^6) and 86.6% (0.8^9).

Epoch budgets keep the paper's proportions, all scaled by one common factor (= dense epochs / 160):

- dense pretraining: D steps (paper: 160 epochs), lr 0.1, wd 5e-4, cosine;
- IMP: rounds of D steps each (the dense schedule), 20% of the remaining weights pruned per
  round, rewinding to step round(3/160 * D) of the dense run (paper: epoch 3 of 160);
- BiP (alternating and fused): straight to the target in round(100/160 * D) steps
  (lower lr 0.01, score lr 0.1, gamma 1, wd 1e-4, cosine);
- OMP: one-shot magnitude pruning of the pretrained model, retraining for D steps;
- Hydra: score phase of round(20/160 * D) steps (score lr 0.1), then finetuning under the fixed
  mask for round(100/160 * D) steps (lr 0.01) — Hydra's 20 + 100 epoch CIFAR split.

Timing counts training steps only (batch preparation on the device included, since every method
needs it), with the device synchronised before and after each timed chunk (CUDA events order the
work; perf_counter around the synchronised chunk). Evaluation, checkpoint writes and a per-method
warm-up (a few untimed steps on a throwaway copy) are excluded. Dense pretraining is NOT counted
for any method (all start from it); its time is printed separately. IMP's time at a target is the
sum of its rounds up to that sparsity.

Resumable: every finished run writes runs/<run>.json in the out dir, an unfinished one
ckpt/<run>.pt at each epoch boundary; ``--max-minutes`` stops cleanly at the next epoch boundary
after the budget, and ``--resume`` continues.

    python benchmarks/speedup.py                       # --preset quick
    python benchmarks/speedup.py --preset mid --max-minutes 9 --resume
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

try:
    from . import _common as C
    from . import _speedup_report as R
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    import _speedup_report as R  # type: ignore[no-redef]

import bip_fast
from bip_fast.files import checkpoint as ckpt
from bip_fast.data import BilevelLoader, load_dataset
from bip_fast.models import CifarResNet, build
from bip_fast.pruning import get_algorithm
from bip_fast.pruning.bip import PAPER_HPARAMS as BIP_PAPER_HPARAMS
from bip_fast.pruning.bip import PAPER_SCORE_STEPS, scaled_score_lr

# paper proportions (epochs of the paper's schedules, SPEC §4-5, engine/hparams.py)
PAPER_DENSE_EPOCHS = 160
BIP_FRACTION = 100 / 160
HYDRA_SCORE_FRACTION = 20 / 160
HYDRA_FINETUNE_FRACTION = 100 / 160
REWIND_FRACTION = 3 / 160
IMP_RATE = R.IMP_RATE
TARGET_ROUNDS = R.TARGET_ROUNDS

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-core CPU: <= 10 minutes; one GPU: well under 3 minutes. Not converged: a smoke run.
    "quick": {"arch": "resnet8", "train_subset": 4096, "test_subset": 2000, "dense_epochs": 6,
              "batch_size": 128, "seeds": 1},
    # 2-core CPU, the equal-accuracy regime: a dense start that is converged (checked on the first
    # seed, or every seed with "check_convergence": "all": 1.5x the dense steps gains < 0.5
    # points), every method at 48.8/73.8/86.6%, 3 seeds, about 40 minutes per seed for the
    # BiP/IMP/OMP/Hydra comparison. Why these choices: with the standard crop+flip augmentation,
    # ResNet-8 on 2,000-4,000 images still gains ~4 points from 1.5x more epochs at every budget
    # that fits the hour per seed (augmented CIFAR needs 100+ epochs to converge), so IMP's nine
    # retrainings would again be mostly more training. Without augmentation, 4,000 class-balanced
    # images (400 per class) converge in 18 epochs (558 steps): 1.5x as many steps no longer helps.
    # ResNet-8 (78k weights) is the largest CIFAR ResNet that runs ~950 images/s on 2 cores, so
    # that IMP's 9 rounds (9 x 558 steps) plus every one-shot method fit the hour. The full
    # 10,000-image test set is used for every accuracy (2,000 images alone carry ~1 point of noise).
    "cpu": {"arch": "resnet8", "train_subset": 4000, "test_subset": None, "dense_epochs": 18,
            "batch_size": 128, "augment": False, "seeds": 3, "eval_points": 4, "check_convergence": True},
    # one H100: about 20-25 minutes; run it in pieces with --max-minutes 9 --resume.
    "mid": {"arch": "resnet20", "train_subset": None, "test_subset": None, "dense_epochs": 16,
            "batch_size": 128, "seeds": 1},
    # the paper's schedules: many GPU hours.
    "paper": {"arch": "resnet18", "train_subset": None, "test_subset": None, "dense_epochs": 160,
              "batch_size": 128, "seeds": 1},
}
# run in this order (method by method over all seeds), so an interrupted run has the main comparison
METHODS = ("imp", "bip_alternating", "bip_fused", "bip_official", "omp", "hydra", "bip_paper",
           "gmp", "snip", "grasp", "synflow")
AT_INIT = ("snip", "grasp", "synflow")  # pruned at the dense run's initialisation, then trained D steps
SCORE_SAMPLES = {"snip": 128, "grasp": 100, "synflow": 1}  # SNIP one batch, GraSP 10 per class, SynFlow a shape
BIP_METHODS = tuple(m for m in METHODS if m.startswith("bip"))
LABELS = R.LABELS
CONVERGENCE_FACTOR = 1.5  # the longer dense run of the convergence check
PAPER_BIP_STEPS = PAPER_SCORE_STEPS  # the paper's BiP schedule: 100 epochs of 391 steps (CIFAR-10, batch 128)
# BiP methods: constructor arguments (momentum 0.9 and total_steps are added by make_algorithm).
PAPER_HPARAMS = {"variant": "paper", "schedule": "alternating", **BIP_PAPER_HPARAMS}
# bip_fast's defaults (docs/equal_accuracy.md): the weight lr of dense training, and score_lr=None,
# which BiP resolves to scaled_score_lr(total_steps) (the paper's score lr x steps at any length).
DEFAULT_HPARAMS = dict(PAPER_HPARAMS, lr=0.1, score_lr=None)
BIP_CONFIGS: Dict[str, Dict[str, Any]] = {
    "bip_alternating": dict(DEFAULT_HPARAMS),
    "bip_fused": dict(DEFAULT_HPARAMS, schedule="fused"),
    # the authors' effective update (SPEC §6): both levels at the weight lr (0.1, cosine)
    "bip_official": {"variant": "official", "lr": 0.1, "weight_decay": 1e-4, "lr2": 1e-4},
    "bip_paper": dict(PAPER_HPARAMS),
}


class Stop(Exception):
    """The --max-minutes budget ran out; state is saved, a rerun with --resume continues."""


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

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _build(arch: str) -> torch.nn.Module:
    if arch == "resnet8":  # the engine's CIFAR ResNet at depth 8 (6n+2, n=1): the quick preset's size
        return CifarResNet(8)
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
def evaluate(model: torch.nn.Module, ctx: Ctx) -> float:
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    n = 0
    for x, y in ctx.data.test_loader(500):
        correct += (model(x).argmax(1) == y).sum()
        n += y.shape[0]
    model.train(was)
    return float(correct) / n


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


def execute(ctx: Ctx, run_id: str, alg, segments: List[Segment], seed: int, bilevel: bool,
            extra: Optional[Dict[str, Any]] = None, eval_at: Sequence[int] = ()) -> Dict[str, Any]:
    """Train ``alg`` through ``segments`` (resumable); returns {"train_seconds", "records", "curve", ...}.

    ``eval_at``: step counts (over all segments) after which the model is evaluated on the test
    split; each evaluation appends {"step", "train_seconds", "test_acc"} to ``state["curve"]``
    (evaluation time is not training time)."""
    ck_path = os.path.join(ctx.ckpt_dir, f"{run_id}.pt")
    loader = _loader(ctx, seed, bilevel)
    state = {"seg": 0, "seg_step": 0, "step": 0, "train_seconds": 0.0, "records": [], "curve": [],
             "extra": extra or {}}
    if os.path.exists(ck_path):
        saved = ckpt.load(ck_path, map_location=ctx.device)
        alg.load_state_dict(saved["alg"])
        loader.load_state_dict(saved["loader"])
        state = saved["state"]
        C.log(f"[speedup] {run_id}: resumed at segment {state['seg']} step {state['seg_step']}")
    batches = _batches(loader)
    pending = sorted(set(int(e) for e in eval_at))

    def save():
        ckpt.save_atomic({"alg": alg.state_dict(), "loader": loader.state_dict(), "state": state}, ck_path)

    while state["seg"] < len(segments):
        seg = segments[state["seg"]]
        if state["seg_step"] == 0 and seg.enter is not None:
            seg.enter(alg, state)
        while state["seg_step"] < seg.steps:
            n = min(ctx.steps_per_epoch, seg.steps - state["seg_step"])
            nxt = next((e for e in pending if e > state["step"]), None)
            if nxt is not None:
                n = min(n, nxt - state["step"])
            state["train_seconds"] += _timed_steps(alg, batches, n, bilevel, ctx.device)
            state["seg_step"] += n
            state["step"] += n
            if state["step"] in pending:
                state["curve"].append({"step": state["step"], "train_seconds": state["train_seconds"],
                                       "test_acc": evaluate(alg.model, ctx)})
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
            if ctx.out_of_time():
                raise Stop(run_id)
    if os.path.exists(ck_path):
        os.remove(ck_path)
    return state


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
    os.makedirs(ctx.runs_dir, exist_ok=True)
    tmp = _run_path(ctx, run_id) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, _run_path(ctx, run_id))


def _load_result(ctx: Ctx, run_id: str) -> Optional[Dict[str, Any]]:
    p = _run_path(ctx, run_id)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None


# --------------------------------------------------------------------------------------------
# dense pretraining (cached by config hash)
# --------------------------------------------------------------------------------------------
def pretrain_key(ctx: Ctx, seed: int, factor: float = 1.0) -> Dict[str, Any]:
    c = ctx.cfg
    key = {"arch": c["arch"], "train_subset": c["train_subset"], "test_subset": c["test_subset"],
           "dense_steps": round(factor * ctx.D), "batch_size": c["batch_size"], "lr": 0.1, "weight_decay": 5e-4,
           "momentum": 0.9, "rewind_step": ctx.steps["rewind"], "seed": seed, "device": ctx.device.type,
           "data_seed": 0, "format": 1}
    for k in ("eval_points", "augment"):
        if k in c:
            key[k] = c[k]
    return key


def pretrain(ctx: Ctx, seed: int, factor: float = 1.0) -> Dict[str, Any]:
    """Dense training for ``factor`` x D steps (cosine over all of them), cached by config hash.

    Returns {"final", "rewind", "test_acc", "train_seconds", "curve", "steps", ...}; the curve
    holds test accuracies at ``eval_points`` even fractions of the schedule."""
    key = pretrain_key(ctx, seed, factor)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(ctx.args.cache_dir, exist_ok=True)
    path = os.path.join(ctx.args.cache_dir, f"pretrained-{h}.pt")
    what = "dense pretraining" if factor == 1.0 else f"dense training x{factor:g} (convergence check)"
    if os.path.exists(path):
        obj = ckpt.load(path, map_location=ctx.device)
        C.log(f"[speedup] {what} seed {seed}: cached {path}")
        return obj
    steps = key["dense_steps"]
    torch.manual_seed(seed)
    model = _build(ctx.cfg["arch"]).to(ctx.device)
    alg = bip_fast.Dense(model, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=steps)
    _warmup(ctx, "dense", lambda: bip_fast.Dense(copy.deepcopy(model), total_steps=steps), False)
    run_id = f"pretrain-{h}"

    def snap(a, state):
        state["extra"]["rewind"] = {k: v.detach().clone() for k, v in a.model.state_dict().items()}

    segs = [Segment("dense_to_rewind", ctx.steps["rewind"], end=snap),
            Segment("dense", steps - ctx.steps["rewind"])]
    C.log(f"[speedup] {what} seed {seed}: {steps} steps")
    state = execute(ctx, run_id, alg, segs, seed, False, eval_at=eval_points(steps, ctx.cfg.get("eval_points")))
    obj = {"key": key, "seed": seed, "factor": factor, "steps": steps,
           "final": {k: v.detach().clone() for k, v in alg.model.state_dict().items()},
           "rewind": state["extra"]["rewind"], "test_acc": state["curve"][-1]["test_acc"],
           "curve": state["curve"], "train_seconds": state["train_seconds"]}
    C.log(f"[speedup] {what} seed {seed}: acc {obj['test_acc']:.4f} {obj['train_seconds']:.1f}s")
    ckpt.save_atomic(obj, path)
    return obj


def _model_from(ctx: Ctx, sd: Dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _build(ctx.cfg["arch"]).to(ctx.device)
    model.load_state_dict(sd)
    return model


def _load_plain(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not (k.endswith("mask") or k.endswith("scores"))]
    if bad or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {bad}, unexpected {unexpected}")


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
def run_imp(ctx: Ctx, seed: int, pre: Dict[str, Any]) -> Dict[str, Any]:
    run_id = f"imp-seed{seed}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    rounds = max(TARGET_ROUNDS)
    D = ctx.steps["imp_round"]

    def make():
        alg = bip_fast.IMP(_model_from(ctx, pre["rewind"]), rate=IMP_RATE, rewind_step=0, lr=0.1, momentum=0.9,
                           weight_decay=5e-4, total_steps=D)
        with torch.no_grad():
            _load_plain(alg.model, pre["final"])  # prune from the trained weights, rewind to the early ones
        return alg

    def make_warm():
        a = make()
        a.next_round()
        return a

    _warmup(ctx, "imp", make_warm, False)
    alg = make()

    def enter(a, state):
        a.next_round()

    def end(a, state):
        state["records"].append({"round": a.round, "sparsity": a.sparsity(), "test_acc": evaluate(a.model, ctx),
                                 "cum_train_seconds": state["train_seconds"]})
        r = state["records"][-1]
        C.log(f"[speedup] IMP seed {seed} round {r['round']}: sparsity {r['sparsity']:.4f} acc {r['test_acc']:.4f} "
              f"cum {r['cum_train_seconds']:.1f}s")

    segs = [Segment(f"round{r}", D, enter=enter, end=end) for r in range(1, rounds + 1)]
    state = execute(ctx, run_id, alg, segs, seed, False)
    result = {"method": "imp", "seed": seed, "records": state["records"], "train_seconds": state["train_seconds"]}
    _save_result(ctx, run_id, result)
    return result


def bip_kwargs(method: str, steps: int) -> Dict[str, Any]:
    """BiP constructor arguments of a BiP method of this benchmark (``steps`` = its schedule length),
    with the score learning rate resolved as BiP resolves ``score_lr=None``."""
    kw = dict(BIP_CONFIGS[method])
    if "score_lr" in kw and kw["score_lr"] is None:
        kw["score_lr"] = scaled_score_lr(steps)
    return kw


def make_algorithm(ctx: Ctx, method: str, model: torch.nn.Module, sparsity: float,
                   overrides: Optional[Dict[str, Any]] = None):
    """The algorithm object of a one-shot ``method`` at ``sparsity`` with this preset's schedule."""
    st = ctx.steps
    if method in BIP_CONFIGS:
        kw = dict(bip_kwargs(method, st["bip"]), momentum=0.9, total_steps=st["bip"])
        kw.update(overrides or {})
        return bip_fast.BiP(model, sparsity, **kw)
    if method == "omp":
        return bip_fast.OMP(model, sparsity, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=st["omp"])
    if method == "hydra":
        return bip_fast.Hydra(model, sparsity, score_lr=0.1, lr=0.01, momentum=0.9, weight_decay=5e-4,
                              total_steps=st["hydra_score"], finetune_steps=st["hydra_finetune"])
    common = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=st["omp"])
    if method == "gmp":
        # cubic ramp over the first half of the schedule, ~10 pruning events, then finetuning
        return bip_fast.GMP(model, sparsity, prune_every=max(1, st["omp"] // 20), **common)
    if method in AT_INIT:
        return get_algorithm(method)(model, sparsity, **common)
    raise ValueError(f"method: unknown method {method!r}")


def method_segments(ctx: Ctx, method: str) -> List[Segment]:
    st = ctx.steps
    if method.startswith("bip"):
        return [Segment("bip", st["bip"])]
    if method == "omp":
        return [Segment("omp", st["omp"])]
    if method == "hydra":
        return [Segment("hydra_score", st["hydra_score"]),
                Segment("hydra_finetune", st["hydra_finetune"], enter=lambda a, s: a.finetune())]
    if method == "gmp":
        return [Segment("gmp", st["omp"])]
    if method in AT_INIT:
        def cut(alg, state):  # the scores and the cut count as training time
            batch = next(iter(ctx.data.train_loader(SCORE_SAMPLES[method], seed=7, augment=False)))
            C.synchronize(ctx.device)
            t0 = time.perf_counter()
            alg.prepare([batch])
            C.synchronize(ctx.device)
            state["train_seconds"] += time.perf_counter() - t0
        return [Segment("train", st["omp"], enter=cut)]
    raise ValueError(f"method: unknown method {method!r}")


def run_one_shot(ctx: Ctx, method: str, target_round: int, seed: int, pre: Dict[str, Any],
                 run_id: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                 segments: Optional[List[Segment]] = None) -> Dict[str, Any]:
    sparsity = 1.0 - (1.0 - IMP_RATE) ** target_round
    run_id = run_id or f"{method}-r{target_round}-seed{seed}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    bilevel = method.startswith("bip")

    def make():
        if method in AT_INIT:
            torch.manual_seed(seed)  # the dense run's initialisation (pretrain seeds the same way)
            model = _build(ctx.cfg["arch"]).to(ctx.device)
        else:
            model = _model_from(ctx, pre["final"])
        return make_algorithm(ctx, method, model, sparsity, overrides)

    def make_warm():
        a = make()
        if method in AT_INIT:
            a.prepare([next(iter(ctx.data.train_loader(SCORE_SAMPLES[method], seed=7, augment=False)))])
        return a

    _warmup(ctx, method, make_warm, bilevel)
    alg = make()
    segs = segments or method_segments(ctx, method)
    total = sum(s.steps for s in segs)
    C.log(f"[speedup] {run_id} sparsity {sparsity:.4f}: {total} steps")
    extra = {"initial_masks": [m.detach().clone() for m in alg.masks()]}
    state = execute(ctx, run_id, alg, segs, seed, bilevel, extra=extra,
                    eval_at=eval_points(total, ctx.cfg.get("eval_points")))
    result = {"method": method, "seed": seed, "target_round": target_round, "target_sparsity": sparsity,
              "sparsity": alg.sparsity(), "test_acc": state["curve"][-1]["test_acc"],
              "train_seconds": state["train_seconds"], "steps": total, "curve": state["curve"],
              "overrides": overrides or {}}
    if "initial_masks" in state["extra"]:
        result["mask_change"] = mask_change(state["extra"]["initial_masks"], alg.masks())
    C.log(f"[speedup] {run_id}: sparsity {result['sparsity']:.4f} "
          f"acc {result['test_acc']:.4f} {result['train_seconds']:.1f}s")
    _save_result(ctx, run_id, result)
    return result


def mask_change(before: List[torch.Tensor], after: List[torch.Tensor]) -> float:
    """Fraction of the kept entries of ``after`` that were not kept in ``before``."""
    kept = sum(int(a.sum()) for a in after)
    new = sum(int(((a > 0) & (b == 0)).sum()) for a, b in zip(after, before))
    return new / max(kept, 1)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def setup(args, cfg, device: torch.device):
    """Output folder, data and context of a run of ``cfg`` (a preset name or dict); (None, ...) on
    bad input (the reason is printed). Without ``args.resume`` the folder's runs are cleared;
    with it, the folder must hold runs of the very same configuration."""
    cfg = dict(PRESETS[cfg]) if isinstance(cfg, str) else cfg
    args.cache_dir = args.cache_dir or os.path.join(C.RESULTS_DIR, "cache")
    data_dir = args.data_dir or os.environ.get("BIP_FAST_DATA")
    subset = None if cfg["train_subset"] is None and cfg["test_subset"] is None else (cfg["train_subset"],
                                                                                    cfg["test_subset"])
    try:
        data = load_dataset("cifar10", data_dir=data_dir, device=device, subset=subset, seed=0)
    except FileNotFoundError as e:
        print(f"CIFAR-10 not found and not downloadable: {e}\nPoint --data-dir (or the BIP_FAST_DATA environment "
              f"variable) at a folder holding cifar-10-batches-py.", file=sys.stderr)
        return None, cfg, data_dir
    cfg["train_samples"], cfg["test_samples"] = int(data.train_x.shape[0]), int(data.test_x.shape[0])
    ctx = Ctx(args, cfg, device, data)
    # Finished runs are reused by --resume only under the very same configuration.
    fingerprint = {k: cfg[k] for k in sorted(cfg)}
    fingerprint.update(device=device.type, steps=ctx.steps)
    fp_path = os.path.join(args.out, "config.json")
    if args.resume and os.path.exists(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(fingerprint)):
            print(f"--resume: {args.out} holds runs of another configuration ({old}); use another --out or "
                  f"drop --resume to start over", file=sys.stderr)
            return None, cfg, data_dir
    if not args.resume:
        for sub in ("runs", "ckpt"):
            shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(fp_path, "w") as f:
        json.dump(fingerprint, f, indent=1)
    return ctx, cfg, data_dir


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (else $BIP_FAST_DATA, "
                                                    "else ./data, downloaded through torchvision when online)")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/speedup-<device>-<preset>)")
    p.add_argument("--cache-dir", default=None, help="dense pretraining cache (default benchmarks/results/cache)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (mean ± std when > 1)")
    p.add_argument("--resume", action="store_true", help="keep finished runs and continue unfinished ones")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly at the next epoch boundary "
                                                                    "after this budget (rerun with --resume)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    # overrides of the preset (smoke tests, experiments)
    p.add_argument("--arch", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--dense-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", default=None, help="result JSON (default <out>/speedup.json)")
    args = p.parse_args(argv)

    t_start = time.monotonic()
    device = _device(args.device)
    cfg = dict(PRESETS[args.preset])
    for k in ("arch", "train_subset", "test_subset", "dense_epochs", "batch_size", "seeds"):
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
    if "imp" not in methods:
        methods = ["imp"] + methods  # every ratio is against IMP
    args.out = args.out or os.path.join(C.RESULTS_DIR, f"speedup-{C.device_slug(device)}-{args.preset}")
    ctx, cfg, data_dir = setup(args, cfg, device)
    if ctx is None:
        return 2
    seeds = list(range(cfg["seeds"]))
    factor = cfg["dense_epochs"] / PAPER_DENSE_EPOCHS
    st = ctx.steps
    env = C.environment(device)
    print(C.format_header(env, f"BiP vs IMP end-to-end (preset {args.preset})"))
    print(f"- model {cfg['arch']}, CIFAR-10 {cfg['train_samples']} train / {cfg['test_samples']} test images, "
          f"batch {cfg['batch_size']} ({ctx.steps_per_epoch} steps/epoch), seeds {seeds}")
    print(f"- schedules scaled by {factor:.4g} x the paper's (dense {cfg['dense_epochs']} epochs = {ctx.D} steps): "
          f"IMP {st['imp_round']} steps/round with rewind to step {st['rewind']}; BiP {st['bip']} steps (100/160); "
          f"OMP {st['omp']} steps; Hydra {st['hydra_score']} score + {st['hydra_finetune']} finetune steps (20+100/160)")
    print("- time: training steps only (device synchronised, warm-up/eval/checkpoints excluded); dense "
          "pretraining is shared by all methods and not counted; IMP's time = sum of its rounds so far")
    print()

    results: Dict[str, List[Dict[str, Any]]] = {}
    dense_runs: List[Dict[str, Any]] = []
    long_runs: List[Dict[str, Any]] = []
    stopped = None
    try:
        pres = {}
        for seed in seeds:
            pres[seed] = pre = pretrain(ctx, seed)
            dense_runs.append({"seed": seed, "test_acc": pre["test_acc"], "train_seconds": pre["train_seconds"],
                               "curve": pre.get("curve")})
            if cfg.get("check_convergence") and (seed == seeds[0] or cfg.get("check_convergence") == "all"):
                lg = pretrain(ctx, seed, CONVERGENCE_FACTOR)
                long_runs.append({"seed": seed, "test_acc": lg["test_acc"], "steps": lg.get("steps"),
                                  "factor": CONVERGENCE_FACTOR, "curve": lg.get("curve")})
        # method by method over all seeds, so that an interrupted run leaves whole methods behind
        for m in methods:
            for seed in seeds:
                if m == "imp":
                    results.setdefault("imp", []).append(run_imp(ctx, seed, pres[seed]))
                else:
                    for r in TARGET_ROUNDS:
                        results.setdefault(m, []).append(run_one_shot(ctx, m, r, seed, pres[seed]))
    except Stop as s:
        stopped = str(s)
    accs = [d["test_acc"] for d in dense_runs]
    dense = {"epochs": cfg["dense_epochs"], "acc": statistics.mean(accs) if accs else 0.0,
             "acc_std": statistics.stdev(accs) if len(accs) > 1 else None, "acc_per_seed": accs,
             "seconds": statistics.mean(d["train_seconds"] for d in dense_runs) if dense_runs else 0.0}
    if cfg.get("check_convergence"):
        conv = R.convergence(dense_runs, long_runs)
        dense.update(converged=conv["converged"], convergence=conv)
    rows = R.aggregate(results, methods)
    checks = R.verdicts(rows, methods)
    tickets = R.winning_tickets(rows, results, dense["acc"], methods) if dense_runs else {}
    print(R.table(rows, dense))
    print()
    if "converged" in dense:
        c = dense["convergence"]
        fmt = (lambda x: "n/a" if x is None else f"{x:+.2f}")
        print(f"- dense start converged: {c['converged']} (last quarter {fmt(c['last_quarter_gain_points'])} points, "
              f"x{CONVERGENCE_FACTOR:g} steps {fmt(c['longer_training_gain_points'])} points; {c['criterion']})")
    for v in checks:
        sp = "" if v["speedup_target"] is None else (
            f" (target >= {v['speedup_target']:g}x: {'pass' if v['speedup_passed'] else 'FAIL'})")
        eq = "never reached" if v["speedup_at_imp_accuracy"] is None else f"{v['speedup_at_imp_accuracy']:.2f}x"
        std = "n/a" if v["imp_acc_std"] is None else f"{100 * v['imp_acc_std']:.2f}"
        print(f"- {100 * v['target_sparsity']:.1f}%: {R.label(v['method'])}: speedup at IMP's accuracy {eq}{sp}, "
              f"fixed budget {v['fixed_budget_speedup']:.2f}x; accuracy {100 * v['acc_delta']:+.2f} points vs IMP "
              f"(IMP std {std}): {v['accuracy_verdict']}")
    if tickets:
        print()
        print(R.tickets_table(tickets, dense["acc"]))
    if stopped:
        print(f"\nstopped after --max-minutes {args.max_minutes} during run {stopped}; partial results above. "
              f"Rerun with --resume to continue.")
    title = f"{cfg['arch']}, CIFAR-10 {cfg['train_samples']} imgs, {args.preset}, {C.device_name(device)}"
    pngs = R.plots(ctx.out, rows, results, dense, title, methods) if rows else []
    path = args.json or os.path.join(args.out, "speedup.json")
    config = dict(cfg, preset=args.preset, device=str(device), methods=methods, steps=st, schedule_factor=factor,
                  targets=[R.target_sparsity(r) for r in TARGET_ROUNDS], data_dir=str(data_dir),
                  cache_dir=args.cache_dir, hparams={
                      "dense/imp/omp": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "schedule": "cosine"},
                      **{m: dict(bip_kwargs(m, st["bip"]), momentum=0.9, schedule_lr="cosine")
                         for m in methods if m in BIP_CONFIGS},
                      "hydra": {"score_lr": 0.1, "score_weight_decay": 5e-4, "lr": 0.01, "weight_decay": 5e-4,
                                "structure": "layer"},
                      "gmp/snip/grasp/synflow": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9,
                                                 "schedule": "cosine", "gmp_prune_every": max(1, st["omp"] // 20),
                                                 "score_samples": SCORE_SAMPLES,
                                                 "init": "snip/grasp/synflow prune the dense run's initialisation"},
                      "imp": {"rate": IMP_RATE, "rewind_step": st["rewind"]}},
                  timing="training steps only, device synchronised; evaluation excluded; dense pretraining not "
                         "counted for any method")
    C.write_json(path, benchmark="speedup", env=env, config=config, rows=[], extra={
        "rows": rows, "verdicts": checks, "dense": dense, "winning_tickets": tickets,
        "complete": stopped is None, "stopped_in": stopped,
        "imp_rounds": [dict(rec, seed=res["seed"]) for res in results.get("imp", []) for rec in res["records"]],
        "plots": pngs, "wall_seconds": time.monotonic() - t_start,
        "continue_command": f"python benchmarks/speedup.py --preset {args.preset} --resume"
                            + ("" if args.max_minutes is None else f" --max-minutes {args.max_minutes:g}"),
        "summary": {"rows": len(rows), "complete": stopped is None}})
    print(f"\nwrote {path}" + "".join(f"\nwrote {q}" for q in pngs))
    print(f"wall-clock {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
