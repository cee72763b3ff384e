"""Accounting and reporting for ``benchmarks/speedup.py``: aggregation over seeds, time to IMP's
accuracy, the dense-convergence check, winning tickets, the markdown tables and the plots.

Everything here is a pure function of the per-run result dicts that speedup.py writes to
``runs/*.json`` (so a report can be rebuilt from committed runs without training anything):

- IMP: ``{"method": "imp", "seed", "records": [{"round", "sparsity", "test_acc",
  "cum_train_seconds"}, ...]}`` -- one record per round, evaluated at the end of the round;
- every other method, one run per target: ``{"method", "seed", "target_round", "sparsity",
  "test_acc", "train_seconds", "curve": [{"step", "train_seconds", "test_acc"}, ...]}`` -- the
  curve holds the evaluations at regular points of the schedule (the last is the final model).
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

IMP_RATE = 0.2
TARGET_ROUNDS = (3, 6, 9)  # 0.8^r: 48.8%, 73.8%, 86.6% sparsity
LABELS = {"imp": "IMP", "bip_alternating": "BiP (alternating)", "bip_fused": "BiP (fused)",
          "bip_official": "BiP (official variant)", "bip_paper": "BiP (paper hparams)", "omp": "OMP",
          "hydra": "Hydra", "gmp": "GMP", "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "dense": "dense"}
SCHEDULES = {"bip_alternating": "alternating", "bip_fused": "fused", "bip_official": "alternating",
             "bip_paper": "alternating", "omp": "one-shot", "hydra": "score+finetune", "gmp": "gradual (cubic)",
             "snip": "at init", "grasp": "at init", "synflow": "at init (data-free)"}
# The speedup targets at equal accuracy (target round -> minimum IMP time / method time).
SPEEDUP_TARGETS = {3: 3.0, 9: 7.0}
CONVERGENCE_POINTS = 0.5  # accuracy points (percent) of the convergence criterion


def target_sparsity(rnd: int) -> float:
    return 1.0 - (1.0 - IMP_RATE) ** rnd


def mean_std(xs: Sequence[float]) -> Tuple[float, Optional[float]]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def label(method: str) -> str:
    return LABELS.get(method, method)


# --------------------------------------------------------------------------------------------
# dense convergence
# --------------------------------------------------------------------------------------------
def convergence(dense_runs: Sequence[Dict[str, Any]], long_runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The dense start is converged when training longer does not pay.

    Criterion: a dense run with 50% more steps (1.5 D, the same cosine schedule stretched) gains
    less than 0.5 accuracy points over the D-step run of the same seed, on the validation split
    (the full test set where the preset has none; mean over the seeds that have both runs; each
    seed's gain is recorded too).

    Also recorded, as evidence but not as a criterion: the gain of the last quarter of each dense
    run, acc(D) - acc(0.75 D). Under a cosine schedule the last quarter is where the learning rate
    anneals (from 15% of its peak to 0), and annealing raises accuracy by a few points whether or
    not the schedule is long enough, so that gain measures the annealing, not convergence.
    """
    key = decision_key(list(dense_runs) + list(long_runs))
    quarter = []
    for run in dense_runs:
        curve = run.get("curve") or []
        if len(curve) >= 2:
            end = curve[-1]
            ref = min(curve[:-1], key=lambda p: abs(p["step"] - 0.75 * end["step"]))
            quarter.append(100.0 * (end[key] - ref[key]))

    def gains(k):
        by_seed = {r["seed"]: r[k] for r in dense_runs}
        return [100.0 * (r[k] - by_seed[r["seed"]]) for r in long_runs if r["seed"] in by_seed]

    longer = gains(key)
    q = statistics.mean(quarter) if quarter else None
    g = statistics.mean(longer) if longer else None
    split = "validation split" if key == "val_acc" else "full test set"
    return {"converged": bool(g is not None and g < CONVERGENCE_POINTS), "decided_on": key,
            "criterion": f"1.5x the dense steps (same cosine schedule, stretched) gains < {CONVERGENCE_POINTS} "
                         f"points on the {split} (mean over seeds; every seed recorded)",
            "longer_training_gain_points": g, "longer_training_gain_per_seed": longer,
            "longer_training_seeds": [r["seed"] for r in long_runs],
            "longer_training_test_gain_per_seed": gains("test_acc"),
            "longer_training_factor": long_runs[0].get("factor") if long_runs else None,
            "last_quarter_gain_points": q, "last_quarter_gain_per_seed": quarter,
            "last_quarter_note": "evidence only: the last quarter of a cosine schedule is its annealing",
            "dense_curves": [{"seed": r["seed"], "curve": r.get("curve")} for r in dense_runs],
            "long_runs": [{"seed": r["seed"], "test_acc": r["test_acc"], "val_acc": r.get("val_acc"),
                           "steps": r.get("steps"),
                           "curve": r.get("curve")} for r in long_runs]}


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _imp_at(results, rnd: int) -> List[Dict[str, Any]]:
    return [rec for res in results.get("imp", []) for rec in res["records"] if rec["round"] == rnd]


def decision_key(points: Sequence[Dict[str, Any]]) -> str:
    """The accuracy that decides: "val_acc" where every point has one, else "test_acc" (presets
    without a validation split)."""
    return "val_acc" if points and all(p.get("val_acc") is not None for p in points) else "test_acc"


def mean_curve(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pointwise mean over seeds of runs evaluated at the same steps (truncated to the shortest)."""
    curves = [r.get("curve") or [] for r in runs]
    n = min((len(c) for c in curves), default=0)
    out = []
    for i in range(n):
        pts = [c[i] for c in curves]
        p = {"step": pts[0]["step"], "train_seconds": statistics.mean(q["train_seconds"] for q in pts)}
        for key in ("test_acc", "val_acc"):
            if all(q.get(key) is not None for q in pts):
                p[key], p[key + "_std"] = mean_std([q[key] for q in pts])
        out.append(p)
    return out


def time_to_accuracy(curve: Sequence[Dict[str, Any]], threshold: float,
                     key: str = "test_acc") -> Optional[Dict[str, Any]]:
    """The first point of ``curve`` whose mean ``key`` accuracy reaches ``threshold`` (None: never)."""
    for p in curve:
        if p[key] >= threshold:
            return p
    return None


# --------------------------------------------------------------------------------------------
# calibrated cost: per-step seconds measured side by side (interleaved, one process) x steps
# --------------------------------------------------------------------------------------------
def cost_at(calib: Optional[Dict[str, Any]], method: str, step: int) -> Optional[float]:
    """Calibrated seconds of ``method`` after ``step`` training steps (IMP: steps over all its
    rounds; Hydra: score steps, then finetuning steps; at-init methods: plus their cut)."""
    if not calib:
        return None
    s = calib["s_per_step"]
    if method == "hydra":
        if "hydra_score" not in s or "hydra_finetune" not in s:
            return None
        n = calib["hydra_score_steps"]
        return s["hydra_score"] * min(step, n) + s["hydra_finetune"] * max(0, step - n)
    if method not in s:
        return None
    return s[method] * step + calib.get("cut_seconds", {}).get(method, 0.0)


def control(calib: Optional[Dict[str, Any]], wall: Dict[str, float], limit: float = 0.05) -> Dict[str, Any]:
    """The same SGD step (dense pretraining, an IMP round, OMP's retraining) must cost the same in
    both accountings: max/min - 1 of the three per-step times, calibrated and wall-clock."""
    def spread(d):
        v = [x for x in d.values() if x]
        return (max(v) / min(v) - 1.0) if len(v) > 1 else None

    cal = {k: calib["s_per_step"][k] for k in ("dense", "imp", "omp") if calib and k in calib["s_per_step"]}
    d_cal, d_wall = spread(cal), spread(wall)
    return {"s_per_step": cal, "max_rel_diff": d_cal, "wall_s_per_step": wall, "wall_max_rel_diff": d_wall,
            "limit": limit, "calibrated_agree": None if d_cal is None else d_cal <= limit,
            "wall_agree": None if d_wall is None else d_wall <= limit}


def aggregate(results: Dict[str, List[Dict[str, Any]]], methods: Sequence[str],
              calib: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """One row per (target, method): fixed-budget accuracy and time, plus time to IMP's accuracy.

    IMP's accuracy is its mean validation accuracy at the target (the test accuracy where the
    preset has no validation split); a method reaches it at the first evaluation point whose mean
    (over seeds) reaches it, and its test accuracy is reported at that point. Time is counted
    twice: the calibrated cost (``calib``'s per-step seconds x steps) and the wall clock of the
    runs; the headline speedups use the calibrated cost when there is one."""
    rows: List[Dict[str, Any]] = []
    for rnd in TARGET_ROUNDS:
        target = target_sparsity(rnd)
        imp = _imp_at(results, rnd)
        key = decision_key(imp)
        imp_acc = imp_sec = imp_cost = None
        if imp:
            imp_acc, imp_std = mean_std([x["test_acc"] for x in imp])
            imp_sec = statistics.mean(x["cum_train_seconds"] for x in imp)
            steps = [x.get("cum_steps") for x in imp]
            imp_cost = cost_at(calib, "imp", statistics.mean(steps)) if None not in steps else None
            row = {"method": "imp", "schedule": f"{rnd} rounds", "target_sparsity": target,
                   "sparsity": statistics.mean(x["sparsity"] for x in imp), "test_acc": imp_acc,
                   "test_acc_std": imp_std, "test_acc_per_seed": [x["test_acc"] for x in imp],
                   "n_seeds": len(imp), "train_seconds": imp_sec, "cost_seconds": imp_cost, "imp_time_ratio": 1.0,
                   "decided_on": key}
            if key == "val_acc":
                row["val_acc"], row["val_acc_std"] = mean_std([x["val_acc"] for x in imp])
                row["val_acc_per_seed"] = [x["val_acc"] for x in imp]
            rows.append(row)
            threshold = row[key] if key == "val_acc" else imp_acc
        for m in methods:
            if m == "imp":
                continue
            got = [x for x in results.get(m, []) if x["target_round"] == rnd]
            if not got:
                continue
            acc, std = mean_std([x["test_acc"] for x in got])
            sec = statistics.mean(x["train_seconds"] for x in got)
            cost = cost_at(calib, m, statistics.mean(x["steps"] for x in got))
            curve = mean_curve(got)
            for p in curve:
                p["cost_seconds"] = cost_at(calib, m, p["step"])
            row = {"method": m, "schedule": SCHEDULES.get(m, m), "target_sparsity": target,
                   "sparsity": statistics.mean(x["sparsity"] for x in got), "test_acc": acc, "test_acc_std": std,
                   "test_acc_per_seed": [x["test_acc"] for x in got], "n_seeds": len(got),
                   "train_seconds": sec, "cost_seconds": cost,
                   "imp_time_ratio": (imp_sec / sec) if imp_sec else None,
                   "imp_cost_ratio": (imp_cost / cost) if imp_cost and cost else None,
                   "curve": curve, "hparams": got[0].get("hparams")}
            if all(x.get("val_acc") is not None for x in got):
                row["val_acc"], row["val_acc_std"] = mean_std([x["val_acc"] for x in got])
                row["val_acc_per_seed"] = [x["val_acc"] for x in got]
            if imp:
                ckey = key if all(key in p for p in curve) else "test_acc"
                hit = time_to_accuracy(curve, threshold, ckey)
                row.update(imp_accuracy_threshold=threshold, decided_on=ckey)
                row["steps_to_imp_accuracy"] = None if hit is None else hit["step"]
                row["wall_seconds_to_imp_accuracy"] = None if hit is None else hit["train_seconds"]
                row["cost_seconds_to_imp_accuracy"] = None if hit is None else hit["cost_seconds"]
                row["test_acc_at_imp_accuracy"] = None if hit is None else hit["test_acc"]
                row["wall_speedup_at_imp_accuracy"] = None if hit is None else imp_sec / hit["train_seconds"]
                row["cost_speedup_at_imp_accuracy"] = (None if hit is None or not imp_cost or not hit["cost_seconds"]
                                                       else imp_cost / hit["cost_seconds"])
                row["speedup_at_imp_accuracy"] = (row["cost_speedup_at_imp_accuracy"] if calib
                                                  else row["wall_speedup_at_imp_accuracy"])
                best = max((p[ckey] for p in curve), default=acc)
                row["gap_to_imp_accuracy"] = None if hit is not None else threshold - best
            rows.append(row)
    return rows


def verdicts(rows: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """Per target and BiP method: accuracy against IMP's mean - std, and the speedup there."""
    out = []
    for rnd in TARGET_ROUNDS:
        t = target_sparsity(rnd)
        imp = next((x for x in rows if x["method"] == "imp" and abs(x["target_sparsity"] - t) < 1e-9), None)
        if imp is None:
            continue
        for m in methods:
            if not m.startswith("bip"):
                continue
            b = next((x for x in rows if x["method"] == m and abs(x["target_sparsity"] - t) < 1e-9), None)
            if b is None:
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
            need = SPEEDUP_TARGETS.get(rnd)
            eq = b.get("speedup_at_imp_accuracy")
            fixed = b["imp_cost_ratio"] if b.get("imp_cost_ratio") is not None else b["imp_time_ratio"]
            out.append({"target_sparsity": t, "method": m, "fixed_budget_speedup": fixed,
                        "wall_fixed_budget_speedup": b["imp_time_ratio"],
                        "speedup_at_imp_accuracy": eq, "speedup_target": need,
                        "speedup_passed": None if need is None else bool(eq is not None and eq >= need),
                        "acc_delta": b["test_acc"] - imp["test_acc"], "imp_acc_std": std,
                        "accuracy_verdict": acc_v,
                        "accuracy_passed": acc_v in ("better or equal", "within one std")})
    return out


def winning_tickets(rows: List[Dict[str, Any]], results, dense_acc: float, methods: Sequence[str]) -> Dict[str, Any]:
    """Per method, the sparsest evaluated sparsity whose mean accuracy is >= the dense mean.

    IMP is evaluated at every round of the paper's series it ran; the one-shot methods only at the
    targets they ran (so their ticket can only be one of those sparsities)."""
    out: Dict[str, Any] = {}
    rounds = sorted({rec["round"] for res in results.get("imp", []) for rec in res["records"]})
    imp_pts = []
    for rnd in rounds:
        recs = _imp_at(results, rnd)
        acc, std = mean_std([x["test_acc"] for x in recs])
        imp_pts.append({"sparsity": statistics.mean(x["sparsity"] for x in recs), "test_acc": acc, "test_acc_std": std,
                        "n_seeds": len(recs)})
    series = {"imp": imp_pts}
    for m in methods:
        if m != "imp":
            series[m] = [{"sparsity": r["sparsity"], "test_acc": r["test_acc"], "test_acc_std": r["test_acc_std"],
                          "n_seeds": r["n_seeds"]} for r in rows if r["method"] == m]
    for m, pts in series.items():
        if not pts:
            continue
        wins = [p for p in pts if p["test_acc"] >= dense_acc]
        out[m] = {"sparsest_winning_ticket": max((p["sparsity"] for p in wins), default=None),
                  "evaluated": pts}
    return out


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _pct(x: Optional[float], std: Optional[float] = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def table(rows: List[Dict[str, Any]], dense: Dict[str, Any]) -> str:
    """Markdown table: accuracy (validation, test), cost (calibrated s, wall s), the fixed-budget
    cost ratio against IMP and the cost to reach IMP's accuracy (with the test accuracy there)."""
    head = ["target sparsity", "method", "schedule", "sparsity", "seeds", "val acc %", "test acc % (mean ± std)",
            "cost s", "wall s", "IMP cost / cost (fixed budget)", "cost s to IMP val acc (test acc % there)",
            "speedup at IMP acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines.append(f"| 0% | dense (start of all) | {dense['epochs']} epochs | 0.0000 | {len(dense.get('acc_per_seed', []))} | "
                 f"{_pct(dense.get('val_acc'), dense.get('val_acc_std'))} | {_pct(dense['acc'], dense.get('acc_std'))} | "
                 f"| {dense['seconds']:.1f} (not counted) | | | |")

    def sec(x):
        return "n/a" if x is None else f"{x:.1f}"

    for r in rows:
        fixed = r.get("imp_cost_ratio") if r.get("imp_cost_ratio") is not None else r["imp_time_ratio"]
        ratio = "" if fixed is None or r["method"] == "imp" else f"{fixed:.2f}x"
        if r["method"] == "imp" or "steps_to_imp_accuracy" not in r:
            tta = eq = ""
        elif r["steps_to_imp_accuracy"] is None:
            tta, eq = f"never ({100 * r['gap_to_imp_accuracy']:.2f} short)", "-"
        else:
            t = r["cost_seconds_to_imp_accuracy"]
            t = r["wall_seconds_to_imp_accuracy"] if t is None else t
            tta = f"{t:.1f} ({100 * r['test_acc_at_imp_accuracy']:.2f})"
            eq = "n/a" if r["speedup_at_imp_accuracy"] is None else f"{r['speedup_at_imp_accuracy']:.2f}x"
        lines.append(f"| {100 * r['target_sparsity']:.1f}% | {label(r['method'])} | {r['schedule']} | "
                     f"{r['sparsity']:.4f} | {r['n_seeds']} | {_pct(r.get('val_acc'), r.get('val_acc_std'))} | "
                     f"{_pct(r['test_acc'], r['test_acc_std'])} | {sec(r.get('cost_seconds'))} | "
                     f"{r['train_seconds']:.1f} | {ratio} | {tta} | {eq} |")
    return "\n".join(lines)


def headline_table(rows: List[Dict[str, Any]], methods: Sequence[str]) -> str:
    """Compact markdown table of ``methods`` (IMP first): validation and test accuracy, calibrated
    cost, the fixed-budget cost ratio and the speedup at IMP's validation accuracy."""
    head = ["sparsity", "method", "val acc %", "test acc %", "cost s", "IMP cost / cost", "speedup at IMP val acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["method"] not in methods:
            continue
        cost = r.get("cost_seconds")
        fixed = "" if r["method"] == "imp" or r.get("imp_cost_ratio") is None else f"{r['imp_cost_ratio']:.2f}x"
        eq = "" if r["method"] == "imp" else ("never" if r.get("speedup_at_imp_accuracy") is None
                                              else f"{r['speedup_at_imp_accuracy']:.2f}x")
        lines.append(f"| {100 * r['target_sparsity']:.1f}% | {label(r['method'])} | "
                     f"{_pct(r.get('val_acc'), r.get('val_acc_std'))} | {_pct(r['test_acc'], r['test_acc_std'])} | "
                     f"{'n/a' if cost is None else f'{cost:.1f}'} | {fixed} | {eq} |")
    return "\n".join(lines)


def tuning_table(tuning: Dict[str, Any]) -> str:
    """Markdown table of the tuning grid: every configuration tried, its validation accuracy, the choice."""
    lines = ["| method | configuration | val acc % | test acc % | chosen |", "|---|---|---|---|---|"]
    for m, t in tuning.items():
        if t.get("shares"):
            lines.append(f"| {label(m)} | {_cfg(t['chosen'])} (the choice of {label(t['shares'])}) | | | yes |")
            continue
        if not t.get("configs"):
            lines.append(f"| {label(m)} | {_cfg(t['chosen'])} (not tuned) | | | yes |")
            continue
        for c in t["configs"]:
            lines.append(f"| {label(m)} | {_cfg(c['config'])} | {_pct(c['val_acc'])} | {_pct(c['test_acc'])} | "
                         f"{'yes' if c['config'] == t['chosen'] else ''} |")
    return "\n".join(lines)


def _cfg(c: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items())


def tickets_table(tickets: Dict[str, Any], dense_acc: float) -> str:
    lines = [f"Sparsest winning ticket (mean accuracy >= dense mean {100 * dense_acc:.2f}%):", "",
             "| method | sparsest winning ticket | sparsities evaluated |", "|---|---|---|"]
    for m, t in tickets.items():
        s = t["sparsest_winning_ticket"]
        pts = ", ".join(f"{100 * p['sparsity']:.1f}% ({100 * p['test_acc']:.2f})" for p in t["evaluated"])
        lines.append(f"| {label(m)} | {'none' if s is None else f'{100 * s:.1f}%'} | {pts} |")
    return "\n".join(lines)
