"""What keeps ``benchmarks/speedup.py`` a fair comparison: the tuning grid (the same budget and the
same rule for every tuned method, decided on the validation split) and the calibrated cost (every
method's per-step seconds measured side by side, interleaved in one process, so that a machine
that drifts or a neighbour that wakes up moves every method alike).

Tuning: each method of ``GRIDS`` runs every configuration of its grid at ``TUNE_ROUND`` (48.8%)
from the dense model of seed ``TUNE_SEED`` and keeps the one with the highest final validation
accuracy (ties: the earlier configuration). The chosen run is the method's run at that target and
seed (same run id), and IMP's chosen run goes on from its tuning rounds to round 9.

Calibration: one algorithm object per step kind (dense, an IMP round at 73.8%, OMP, each BiP
variant, Hydra's score and finetuning phases, GMP, the at-init methods after their cut) on the
same dense weights; rounds of ``chunk`` steps, one chunk of each kind per round in a shuffled
order, the first round discarded; a kind's per-step time is the median over its chunks. The
at-init methods' cut (scores + projection) is timed on its own (median of 3).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

import torch

try:  # imported as part of a package (python -m benchmarks.speedup)
    from . import _common as C
    from ._speedup_loop import Ctx, _batches, _build, _load_result, _loader, _save_result, _timed_steps
    from ._speedup_presets import AT_INIT, GRIDS, IMP_RATE, TUNE_ROUND, TUNE_SEED, TUNE_SHARES
    from ._speedup_runs import _load_plain, dense_algorithm, _model_from, hparams, make_algorithm, run_imp, run_one_shot, score_batch
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_loop import (  # type: ignore[no-redef]
        Ctx, _batches, _build, _load_result, _loader, _save_result, _timed_steps)
    from _speedup_presets import AT_INIT, GRIDS, IMP_RATE, TUNE_ROUND, TUNE_SEED, TUNE_SHARES  # type: ignore[no-redef]
    from _speedup_runs import (  # type: ignore[no-redef]
        _load_plain, _model_from, dense_algorithm, hparams, make_algorithm, run_imp, run_one_shot, score_batch)

import bip_fast

RULE = (f"highest final validation accuracy at {100 * (1 - (1 - IMP_RATE) ** TUNE_ROUND):.1f}% sparsity, "
        f"seed {TUNE_SEED} (ties: the earlier configuration); the choice serves every target and seed")


# --------------------------------------------------------------------------------------------
# tuning
# --------------------------------------------------------------------------------------------
def tune(ctx: Ctx, methods: Sequence[str], pre: Dict[str, Any], grids: bool = True) -> Dict[str, Any]:
    """Run the grids of the tuned ``methods`` on the dense model ``pre`` (seed TUNE_SEED), set
    ``ctx.chosen`` and return {method: {"configs": [...], "chosen", ...}} for every method, in
    the order of ``methods`` (``grids=False``: no grid runs, every method keeps its settings)."""
    out: Dict[str, Any] = {}
    for m in [m for m in GRIDS if m in methods and grids]:
        tried = []
        for cfg in GRIDS[m]:
            hp = hparams(ctx, m, cfg)
            if m == "imp":
                res = run_imp(ctx, TUNE_SEED, pre, hp, until_round=TUNE_ROUND)
                got = next(r for r in res["records"] if r["round"] == TUNE_ROUND)
            else:
                got = run_one_shot(ctx, m, TUNE_ROUND, TUNE_SEED, pre, hp=hp)
            tried.append({"config": cfg, "hparams": hp, "val_acc": got["val_acc"], "test_acc": got["test_acc"]})
            C.log(f"[speedup] tuning {m} {cfg}: val {got['val_acc']:.4f}")
        best = max(range(len(tried)), key=lambda i: (tried[i]["val_acc"], -i))
        ctx.chosen[m] = dict(GRIDS[m][best])
        out[m] = {"configs": tried, "chosen": GRIDS[m][best], "chosen_hparams": tried[best]["hparams"],
                  "target_sparsity": 1 - (1 - IMP_RATE) ** TUNE_ROUND, "seed": TUNE_SEED, "rule": RULE}
    for m, src in TUNE_SHARES.items():
        if m in methods and src in ctx.chosen:
            ctx.chosen[m] = dict(ctx.chosen[src])
            out[m] = {"configs": [], "shares": src, "chosen": ctx.chosen[m], "chosen_hparams": hparams(ctx, m)}
    for m in methods:
        if m not in out:
            out[m] = {"configs": [], "tuned": False, "chosen": hparams(ctx, m), "chosen_hparams": hparams(ctx, m)}
    return {m: out[m] for m in methods}


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------
def _kinds(ctx: Ctx, methods: Sequence[str], pre: Dict[str, Any], target_round: int) -> Dict[str, Any]:
    """step kind -> (algorithm object, bilevel): every kind of training step the methods take."""
    sparsity = 1.0 - (1.0 - IMP_RATE) ** target_round
    st = ctx.steps
    kinds: Dict[str, Any] = {"dense": (dense_algorithm(ctx, _model_from(ctx, pre["final"]), ctx.D), False)}
    for m in methods:
        if m == "imp":
            a = bip_fast.IMP(_model_from(ctx, pre["rewind"]), rate=IMP_RATE, rewind_step=0, momentum=0.9,
                             total_steps=st["imp_round"], **hparams(ctx, "imp"))
            with torch.no_grad():
                _load_plain(a.model, pre["final"])
            for _ in range(target_round):
                a.next_round()
            kinds["imp"] = (a, False)
        elif m in AT_INIT:
            torch.manual_seed(0)
            a = make_algorithm(ctx, m, _build(ctx.cfg["arch"]).to(ctx.device), sparsity)
            a.prepare([score_batch(ctx, m, 0)])
            kinds[m] = (a, False)
        elif m == "hydra":
            kinds["hydra_score"] = (make_algorithm(ctx, m, _model_from(ctx, pre["final"]), sparsity), False)
            a = make_algorithm(ctx, m, _model_from(ctx, pre["final"]), sparsity)
            a.finetune()
            kinds["hydra_finetune"] = (a, False)
        else:
            kinds[m] = (make_algorithm(ctx, m, _model_from(ctx, pre["final"]), sparsity), m.startswith("bip"))
    return kinds


def _cut_seconds(ctx: Ctx, method: str, repeats: int = 3) -> float:
    times = []
    sparsity = 1.0 - (1.0 - IMP_RATE) ** 6
    for _ in range(repeats + 1):
        torch.manual_seed(0)
        a = make_algorithm(ctx, method, _build(ctx.cfg["arch"]).to(ctx.device), sparsity)
        batch = score_batch(ctx, method, 0)
        C.synchronize(ctx.device)
        t0 = time.perf_counter()
        a.prepare([batch])
        C.synchronize(ctx.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def calibrate(ctx: Ctx, methods: Sequence[str], pre: Dict[str, Any], rounds: int = 20, chunk: int = 4,
              target_round: int = 6) -> Dict[str, Any]:
    """Per-step seconds of every step kind, measured interleaved in this process (saved as
    runs/calibration.json and reused by --resume)."""
    done = _load_result(ctx, "calibration")
    if done is not None and set(done["kinds"]) >= set(_kind_names(methods)):
        return done
    kinds = _kinds(ctx, methods, pre, target_round)
    feeds = {k: _batches(_loader(ctx, 500 + i, bilevel)) for i, (k, (_, bilevel)) in enumerate(kinds.items())}
    per: Dict[str, List[float]] = {k: [] for k in kinds}
    rng = random.Random(0)
    C.log(f"[speedup] calibration: {len(kinds)} step kinds x {rounds} rounds of {chunk} steps, interleaved")
    for r in range(rounds + 1):
        order = list(kinds)
        rng.shuffle(order)
        for k in order:
            alg, bilevel = kinds[k]
            t = _timed_steps(alg, feeds[k], chunk, bilevel, ctx.device) / chunk
            if r > 0:  # the first round warms every kind up
                per[k].append(t)
    out = {"s_per_step": {k: statistics.median(v) for k, v in per.items()},
           "s_per_step_p20_p80": {k: [_quantile(v, 0.2), _quantile(v, 0.8)] for k, v in per.items()},
           "s_per_step_rounds": per,  # round r of every kind ran in one shuffled pass: pairs across kinds
           "cut_seconds": {m: _cut_seconds(ctx, m) for m in methods if m in AT_INIT},
           "hydra_score_steps": ctx.steps["hydra_score"], "kinds": sorted(kinds), "rounds": rounds, "chunk": chunk,
           "target_sparsity": 1.0 - (1.0 - IMP_RATE) ** target_round,
           "method": "per-step seconds: median over rounds of chunk-step timings, one chunk of every kind per "
                     "round in a shuffled order, one process; the first round discarded"}
    for k, v in out["s_per_step"].items():
        C.log(f"[speedup] calibration {k}: {1000 * v:.1f} ms/step")
    _save_result(ctx, "calibration", out)
    return out


def _kind_names(methods: Sequence[str]) -> List[str]:
    names = ["dense"]
    for m in methods:
        names += ["hydra_score", "hydra_finetune"] if m == "hydra" else [m]
    return names


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def wall_per_step(dense_runs: Sequence[Dict[str, Any]], results: Dict[str, List[Dict[str, Any]]]) -> Dict[str, float]:
    """Wall-clock seconds per step of the same SGD step in the runs: dense pretraining, IMP's
    rounds and OMP's retraining (means over the runs that finished)."""
    out: Dict[str, float] = {}
    dense = [d["train_seconds"] / d["steps"] for d in dense_runs if d.get("steps")]
    imp = [r["train_seconds"] / r["records"][-1]["cum_steps"] for r in results.get("imp", [])
           if r.get("records") and r["records"][-1].get("cum_steps")]
    omp = [r["train_seconds"] / r["steps"] for r in results.get("omp", [])]
    for k, v in (("dense", dense), ("imp", imp), ("omp", omp)):
        if v:
            out[k] = statistics.mean(v)
    return out

