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
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

try:
    from . import _common as C
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]

import bip_fast
from bip_fast.engine import checkpoint as ckpt
from bip_fast.engine.data import BilevelLoader, load_dataset
from bip_fast.engine.models import CifarResNet, build

# paper proportions (epochs of the paper's schedules, SPEC §4-5, engine/hparams.py)
PAPER_DENSE_EPOCHS = 160
BIP_FRACTION = 100 / 160
HYDRA_SCORE_FRACTION = 20 / 160
HYDRA_FINETUNE_FRACTION = 100 / 160
REWIND_FRACTION = 3 / 160
IMP_RATE = 0.2
TARGET_ROUNDS = (3, 6, 9)  # 0.8^r: 48.8%, 73.8%, 86.6% sparsity

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-core CPU: <= 10 minutes; one GPU: well under 3 minutes.
    "quick": {"arch": "resnet8", "train_subset": 4096, "test_subset": 2000, "dense_epochs": 6,
              "batch_size": 128, "seeds": 1},
    # one H100: about 20-25 minutes; run it in pieces with --max-minutes 9 --resume.
    "mid": {"arch": "resnet20", "train_subset": None, "test_subset": None, "dense_epochs": 16,
            "batch_size": 128, "seeds": 1},
    # the paper's schedules: many GPU hours.
    "paper": {"arch": "resnet18", "train_subset": None, "test_subset": None, "dense_epochs": 160,
              "batch_size": 128, "seeds": 1},
}
METHODS = ("imp", "bip_alternating", "bip_fused", "bip_official", "omp", "hydra")
BIP_METHODS = ("bip_alternating", "bip_fused", "bip_official")
LABELS = {"imp": "IMP", "bip_alternating": "BiP (alternating)", "bip_fused": "BiP (fused)",
          "bip_official": "BiP (official variant)", "omp": "OMP",
          "hydra": "Hydra", "dense": "dense"}


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
    lower = d.train_loader(bs, seed=1000 * seed + 1)
    if not bilevel:
        return lower
    return BilevelLoader(lower, d.train_loader(bs, seed=1000 * seed + 2))


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


def execute(ctx: Ctx, run_id: str, alg, segments: List[Segment], seed: int, bilevel: bool,
            extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train ``alg`` through ``segments`` (resumable); returns {"train_seconds", "records", ...}."""
    ck_path = os.path.join(ctx.ckpt_dir, f"{run_id}.pt")
    loader = _loader(ctx, seed, bilevel)
    state = {"seg": 0, "seg_step": 0, "train_seconds": 0.0, "records": [], "extra": extra or {}}
    if os.path.exists(ck_path):
        saved = ckpt.load(ck_path, map_location=ctx.device)
        alg.load_state_dict(saved["alg"])
        loader.load_state_dict(saved["loader"])
        state = saved["state"]
        C.log(f"[speedup] {run_id}: resumed at segment {state['seg']} step {state['seg_step']}")
    batches = _batches(loader)
    chunk = ctx.steps_per_epoch

    def save():
        ckpt.save_atomic({"alg": alg.state_dict(), "loader": loader.state_dict(), "state": state}, ck_path)

    while state["seg"] < len(segments):
        seg = segments[state["seg"]]
        if state["seg_step"] == 0 and seg.enter is not None:
            seg.enter(alg, state)
        while state["seg_step"] < seg.steps:
            n = min(chunk, seg.steps - state["seg_step"])
            state["train_seconds"] += _timed_steps(alg, batches, n, bilevel, ctx.device)
            state["seg_step"] += n
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
def pretrain_key(ctx: Ctx, seed: int) -> Dict[str, Any]:
    c = ctx.cfg
    return {"arch": c["arch"], "train_subset": c["train_subset"], "test_subset": c["test_subset"],
            "dense_steps": ctx.D, "batch_size": c["batch_size"], "lr": 0.1, "weight_decay": 5e-4,
            "momentum": 0.9, "rewind_step": ctx.steps["rewind"], "seed": seed, "device": ctx.device.type,
            "data_seed": 0, "format": 1}


def pretrain(ctx: Ctx, seed: int) -> Dict[str, Any]:
    key = pretrain_key(ctx, seed)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(ctx.args.cache_dir, exist_ok=True)
    path = os.path.join(ctx.args.cache_dir, f"pretrained-{h}.pt")
    if os.path.exists(path):
        obj = ckpt.load(path, map_location=ctx.device)
        C.log(f"[speedup] dense pretraining seed {seed}: cached {path}")
        return obj
    torch.manual_seed(seed)
    model = _build(ctx.cfg["arch"]).to(ctx.device)
    alg = bip_fast.Dense(model, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=ctx.D)
    _warmup(ctx, "dense", lambda: bip_fast.Dense(copy.deepcopy(model), total_steps=ctx.D), False)
    run_id = f"pretrain-{h}"

    def snap(a, state):
        state["extra"]["rewind"] = {k: v.detach().clone() for k, v in a.model.state_dict().items()}

    segs = [Segment("dense_to_rewind", ctx.steps["rewind"], end=snap),
            Segment("dense", ctx.D - ctx.steps["rewind"])]
    C.log(f"[speedup] dense pretraining seed {seed}: {ctx.D} steps")
    state = execute(ctx, run_id, alg, segs, seed, False)
    obj = {"key": key, "final": {k: v.detach().clone() for k, v in alg.model.state_dict().items()},
           "rewind": state["extra"]["rewind"], "test_acc": evaluate(alg.model, ctx),
           "train_seconds": state["train_seconds"]}
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


def run_one_shot(ctx: Ctx, method: str, target_round: int, seed: int, pre: Dict[str, Any]) -> Dict[str, Any]:
    sparsity = 1.0 - (1.0 - IMP_RATE) ** target_round
    run_id = f"{method}-r{target_round}-seed{seed}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    bilevel = method.startswith("bip")
    st = ctx.steps

    def make():
        model = _model_from(ctx, pre["final"])
        if method == "bip_official":
            # The authors' effective update (SPEC §6): both levels at the weight lr (0.1, cosine).
            return bip_fast.BiP(model, sparsity, variant="official", lr=0.1, momentum=0.9, weight_decay=1e-4,
                                lr2=1e-4, total_steps=st["bip"])
        if bilevel:
            return bip_fast.BiP(model, sparsity, schedule=method.split("_", 1)[1], lr=0.01, score_lr=0.1,
                                momentum=0.9, weight_decay=1e-4, gamma=1.0, total_steps=st["bip"])
        if method == "omp":
            return bip_fast.OMP(model, sparsity, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=st["omp"])
        return bip_fast.Hydra(model, sparsity, score_lr=0.1, lr=0.01, momentum=0.9, weight_decay=5e-4,
                              total_steps=st["hydra_score"], finetune_steps=st["hydra_finetune"])

    _warmup(ctx, method, make, bilevel)
    alg = make()
    if bilevel:
        segs = [Segment("bip", st["bip"])]
    elif method == "omp":
        segs = [Segment("omp", st["omp"])]
    else:
        segs = [Segment("hydra_score", st["hydra_score"]),
                Segment("hydra_finetune", st["hydra_finetune"], enter=lambda a, s: a.finetune())]
    C.log(f"[speedup] {method} sparsity {sparsity:.4f} seed {seed}: {sum(s.steps for s in segs)} steps")
    state = execute(ctx, run_id, alg, segs, seed, bilevel)
    result = {"method": method, "seed": seed, "target_round": target_round, "target_sparsity": sparsity,
              "sparsity": alg.sparsity(), "test_acc": evaluate(alg.model, ctx),
              "train_seconds": state["train_seconds"]}
    C.log(f"[speedup] {method} r{target_round} seed {seed}: sparsity {result['sparsity']:.4f} "
          f"acc {result['test_acc']:.4f} {result['train_seconds']:.1f}s")
    _save_result(ctx, run_id, result)
    return result


# --------------------------------------------------------------------------------------------
# aggregation, table, plots
# --------------------------------------------------------------------------------------------
def _ms(xs: List[float]) -> Tuple[float, Optional[float]]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(results: Dict[str, List[Dict[str, Any]]], seeds: List[int]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for r in TARGET_ROUNDS:
        target = 1.0 - (1.0 - IMP_RATE) ** r
        per: Dict[str, Dict[str, Any]] = {}
        imp = [rec for res in results.get("imp", []) for rec in res["records"] if rec["round"] == r]
        if imp:
            per["imp"] = {"schedule": f"{r} rounds", "sp": [x["sparsity"] for x in imp],
                          "acc": [x["test_acc"] for x in imp], "sec": [x["cum_train_seconds"] for x in imp]}
        for m in METHODS[1:]:
            got = [x for x in results.get(m, []) if x["target_round"] == r]
            if got:
                sched = {"bip_alternating": "alternating", "bip_fused": "fused", "bip_official": "alternating",
                         "omp": "one-shot",
                         "hydra": "score+finetune"}[m]
                per[m] = {"schedule": sched, "sp": [x["sparsity"] for x in got], "acc": [x["test_acc"] for x in got],
                          "sec": [x["train_seconds"] for x in got]}
        imp_sec = statistics.mean(per["imp"]["sec"]) if "imp" in per else None
        for m in METHODS:
            if m not in per:
                continue
            p = per[m]
            acc, acc_std = _ms(p["acc"])
            sec = statistics.mean(p["sec"])
            rows.append({"method": m, "schedule": p["schedule"], "target_sparsity": target,
                         "sparsity": statistics.mean(p["sp"]), "test_acc": acc, "test_acc_std": acc_std,
                         "n_seeds": len(p["acc"]), "train_seconds": sec,
                         "imp_time_ratio": (imp_sec / sec) if imp_sec else None})
    return rows


def verdicts(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per target and BiP schedule: speedup over IMP and accuracy vs IMP's mean minus one std."""
    out = []
    need = {3: 3.0, 9: 10.0}  # the targets: >= 3x at ~49%, >= 10x at ~87%
    for r in TARGET_ROUNDS:
        t = 1.0 - (1.0 - IMP_RATE) ** r
        imp = next((x for x in rows if x["method"] == "imp" and abs(x["target_sparsity"] - t) < 1e-9), None)
        for m in BIP_METHODS:
            b = next((x for x in rows if x["method"] == m and abs(x["target_sparsity"] - t) < 1e-9), None)
            if imp is None or b is None:
                continue
            std = imp["test_acc_std"]
            if b["test_acc"] >= imp["test_acc"]:
                acc_v = "better or equal"
            elif std is not None and b["test_acc"] >= imp["test_acc"] - std:
                acc_v = "within one std"
            elif std is None:
                acc_v = "worse (single seed, no std)"
            else:
                acc_v = "worse by more than one std"
            v = {"target_sparsity": t, "method": m, "speedup": b["imp_time_ratio"],
                 "speedup_target": need.get(r), "acc_delta": b["test_acc"] - imp["test_acc"],
                 "imp_acc_std": std, "accuracy_verdict": acc_v}
            v["speedup_passed"] = None if r not in need else bool(b["imp_time_ratio"] >= need[r])
            v["accuracy_passed"] = acc_v in ("better or equal", "within one std")
            out.append(v)
    return out


def table(rows: List[Dict[str, Any]], dense: Dict[str, Any]) -> str:
    head = ["target sparsity", "method", "schedule", "sparsity", "test acc %", "train s", "IMP time / method time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    std = f" ± {100 * dense['acc_std']:.2f}" if dense.get("acc_std") is not None else ""
    lines.append(f"| 0% | dense (pretraining, start of all) | {dense['epochs']} epochs | 0.0000 | "
                 f"{100 * dense['acc']:.2f}{std} | {dense['seconds']:.1f} (not counted) | |")
    for r in rows:
        s = f" ± {100 * r['test_acc_std']:.2f}" if r["test_acc_std"] is not None else ""
        ratio = "" if r["imp_time_ratio"] is None else f"{r['imp_time_ratio']:.2f}x"
        lines.append(f"| {100 * r['target_sparsity']:.1f}% | {LABELS[r['method']]} | {r['schedule']} | "
                     f"{r['sparsity']:.4f} | {100 * r['test_acc']:.2f}{s} | {r['train_seconds']:.1f} | {ratio} |")
    return "\n".join(lines)


def plots(ctx: Ctx, rows, results, dense, title: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    imp_curve = {}
    for res in results.get("imp", []):
        for rec in res["records"]:
            imp_curve.setdefault(rec["round"], []).append((rec["sparsity"], rec["test_acc"], rec["cum_train_seconds"]))
    imp_pts = [(statistics.mean(a for a, _, _ in v), statistics.mean(b for _, b, _ in v),
                statistics.mean(c for _, _, c in v)) for _, v in sorted(imp_curve.items())]
    for kind, ylabel, fname in (("time", "training time (s, log scale)", "time_vs_sparsity.png"),
                                ("acc", "test accuracy (%)", "accuracy_vs_sparsity.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if imp_pts:
            ax.plot([100 * p[0] for p in imp_pts], [p[2] if kind == "time" else 100 * p[1] for p in imp_pts],
                    "o-", label="IMP (all rounds)")
        for m in METHODS[1:]:
            pts = [r for r in rows if r["method"] == m]
            if pts:
                ax.plot([100 * r["sparsity"] for r in pts],
                        [r["train_seconds"] if kind == "time" else 100 * r["test_acc"] for r in pts], "s-",
                        label=LABELS[m])
        if kind == "time":
            ax.set_yscale("log")
            ax.axhline(dense["seconds"], color="gray", ls="--", lw=1, label="dense pretraining (not counted)")
        else:
            ax.axhline(100 * dense["acc"], color="gray", ls="--", lw=1, label="dense")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(ctx.out, fname)
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


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
    slug = C.device_slug(device)
    args.out = args.out or os.path.join(C.RESULTS_DIR, f"speedup-{slug}-{args.preset}")
    args.cache_dir = args.cache_dir or os.path.join(C.RESULTS_DIR, "cache")
    if not args.resume:
        for sub in ("runs", "ckpt"):
            shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)

    data_dir = args.data_dir or os.environ.get("BIP_FAST_DATA")
    subset = None if cfg["train_subset"] is None and cfg["test_subset"] is None else (cfg["train_subset"],
                                                                                    cfg["test_subset"])
    try:
        data = load_dataset("cifar10", data_dir=data_dir, device=device, subset=subset, seed=0)
    except FileNotFoundError as e:
        print(f"CIFAR-10 not found and not downloadable: {e}\nPoint --data-dir (or the BIP_FAST_DATA environment "
              f"variable) at a folder holding cifar-10-batches-py.", file=sys.stderr)
        return 2
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
            return 2
    with open(fp_path, "w") as f:
        json.dump(fingerprint, f, indent=1)
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
    dense_info = {"epochs": cfg["dense_epochs"], "acc": [], "seconds": []}
    stopped = None
    try:
        for seed in seeds:
            pre = pretrain(ctx, seed)
            dense_info["acc"].append(pre["test_acc"])
            dense_info["seconds"].append(pre["train_seconds"])
            for m in methods:
                if m == "imp":
                    results.setdefault("imp", []).append(run_imp(ctx, seed, pre))
                else:
                    for r in TARGET_ROUNDS:
                        results.setdefault(m, []).append(run_one_shot(ctx, m, r, seed, pre))
    except Stop as s:
        stopped = str(s)
    dense = {"epochs": cfg["dense_epochs"], "acc": statistics.mean(dense_info["acc"]) if dense_info["acc"] else 0.0,
             "acc_std": statistics.stdev(dense_info["acc"]) if len(dense_info["acc"]) > 1 else None,
             "seconds": statistics.mean(dense_info["seconds"]) if dense_info["seconds"] else 0.0}
    rows = aggregate(results, seeds)
    checks = verdicts(rows)
    print(table(rows, dense))
    print()
    for v in checks:
        sp = "" if v["speedup_target"] is None else (
            f" (target >= {v['speedup_target']:g}x: {'pass' if v['speedup_passed'] else 'FAIL'})")
        std = "n/a" if v["imp_acc_std"] is None else f"{100 * v['imp_acc_std']:.2f}"
        print(f"- {100 * v['target_sparsity']:.1f}%: {LABELS[v['method']]} is {v['speedup']:.2f}x faster than IMP{sp}; "
              f"accuracy {100 * v['acc_delta']:+.2f} points vs IMP (IMP std {std}): {v['accuracy_verdict']}")
    if stopped:
        print(f"\nstopped after --max-minutes {args.max_minutes} during run {stopped}; partial results above. "
              f"Rerun with --resume to continue.")
    title = f"{cfg['arch']}, CIFAR-10 {cfg['train_samples']} imgs, {args.preset}, {C.device_name(device)}"
    pngs = plots(ctx, rows, results, dense, title) if rows else []
    path = args.json or os.path.join(args.out, "speedup.json")
    config = dict(cfg, preset=args.preset, device=str(device), methods=methods, steps=st, schedule_factor=factor,
                  targets=[1.0 - (1.0 - IMP_RATE) ** r for r in TARGET_ROUNDS], data_dir=str(data_dir),
                  cache_dir=args.cache_dir, hparams={
                      "dense/imp/omp": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "schedule": "cosine"},
                      "bip": {"lr": 0.01, "score_lr": 0.1, "gamma": 1.0, "weight_decay": 1e-4, "schedule": "cosine"},
                      "hydra": {"score_lr": 0.1, "score_weight_decay": 5e-4, "lr": 0.01, "weight_decay": 5e-4,
                                "structure": "layer"},
                      "imp": {"rate": IMP_RATE, "rewind_step": st["rewind"]}},
                  timing="training steps only, device synchronised; dense pretraining not counted for any method")
    C.write_json(path, benchmark="speedup", env=env, config=config, rows=[], extra={
        "rows": rows, "verdicts": checks, "dense": dense, "complete": stopped is None, "stopped_in": stopped,
        "imp_rounds": [rec for res in results.get("imp", []) for rec in res["records"]],
        "plots": pngs, "wall_seconds": time.monotonic() - t_start,
        "summary": {"rows": len(rows), "complete": stopped is None}})
    print(f"\nwrote {path}" + "".join(f"\nwrote {q}" for q in pngs))
    print(f"wall-clock {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
