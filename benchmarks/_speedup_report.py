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

import os
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
    less than 0.5 accuracy points over the D-step run of the same seed, on the full test set
    (mean over the seeds that have both runs; each seed's gain is recorded too).

    Also recorded, as evidence but not as a criterion: the gain of the last quarter of each dense
    run, acc(D) - acc(0.75 D). Under a cosine schedule the last quarter is where the learning rate
    anneals (from 15% of its peak to 0), and annealing raises accuracy by a few points whether or
    not the schedule is long enough, so that gain measures the annealing, not convergence.
    """
    quarter = []
    for run in dense_runs:
        curve = run.get("curve") or []
        if len(curve) >= 2:
            end = curve[-1]
            ref = min(curve[:-1], key=lambda p: abs(p["step"] - 0.75 * end["step"]))
            quarter.append(100.0 * (end["test_acc"] - ref["test_acc"]))
    by_seed = {r["seed"]: r["test_acc"] for r in dense_runs}
    longer = [100.0 * (r["test_acc"] - by_seed[r["seed"]]) for r in long_runs if r["seed"] in by_seed]
    q = statistics.mean(quarter) if quarter else None
    g = statistics.mean(longer) if longer else None
    return {"converged": bool(g is not None and g < CONVERGENCE_POINTS),
            "criterion": f"1.5x the dense steps (same cosine schedule, stretched) gains < {CONVERGENCE_POINTS} "
                         f"points on the full test set (mean over seeds)",
            "longer_training_gain_points": g, "longer_training_gain_per_seed": longer,
            "longer_training_factor": long_runs[0].get("factor") if long_runs else None,
            "last_quarter_gain_points": q, "last_quarter_gain_per_seed": quarter,
            "last_quarter_note": "evidence only: the last quarter of a cosine schedule is its annealing",
            "dense_curves": [{"seed": r["seed"], "curve": r.get("curve")} for r in dense_runs],
            "long_runs": [{"seed": r["seed"], "test_acc": r["test_acc"], "steps": r.get("steps"),
                           "curve": r.get("curve")} for r in long_runs]}


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _imp_at(results, rnd: int) -> List[Dict[str, Any]]:
    return [rec for res in results.get("imp", []) for rec in res["records"] if rec["round"] == rnd]


def mean_curve(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pointwise mean over seeds of runs evaluated at the same steps (truncated to the shortest)."""
    curves = [r.get("curve") or [] for r in runs]
    n = min((len(c) for c in curves), default=0)
    out = []
    for i in range(n):
        accs = [c[i]["test_acc"] for c in curves]
        acc, std = mean_std(accs)
        out.append({"step": curves[0][i]["step"], "train_seconds": statistics.mean(c[i]["train_seconds"] for c in curves),
                    "test_acc": acc, "test_acc_std": std})
    return out


def time_to_accuracy(curve: Sequence[Dict[str, Any]], threshold: float) -> Tuple[Optional[float], Optional[int]]:
    """Training seconds at the first point of ``curve`` whose mean accuracy reaches ``threshold``."""
    for p in curve:
        if p["test_acc"] >= threshold:
            return p["train_seconds"], p["step"]
    return None, None


def aggregate(results: Dict[str, List[Dict[str, Any]]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per (target, method): fixed-budget accuracy and time, plus time to IMP's accuracy."""
    rows: List[Dict[str, Any]] = []
    for rnd in TARGET_ROUNDS:
        target = target_sparsity(rnd)
        imp = _imp_at(results, rnd)
        imp_acc = imp_std = imp_sec = None
        if imp:
            imp_acc, imp_std = mean_std([x["test_acc"] for x in imp])
            imp_sec = statistics.mean(x["cum_train_seconds"] for x in imp)
            rows.append({"method": "imp", "schedule": f"{rnd} rounds", "target_sparsity": target,
                         "sparsity": statistics.mean(x["sparsity"] for x in imp), "test_acc": imp_acc,
                         "test_acc_std": imp_std, "test_acc_per_seed": [x["test_acc"] for x in imp],
                         "n_seeds": len(imp), "train_seconds": imp_sec, "imp_time_ratio": 1.0})
        threshold = None if imp_acc is None else imp_acc - (imp_std or 0.0)
        for m in methods:
            if m == "imp":
                continue
            got = [x for x in results.get(m, []) if x["target_round"] == rnd]
            if not got:
                continue
            acc, std = mean_std([x["test_acc"] for x in got])
            sec = statistics.mean(x["train_seconds"] for x in got)
            curve = mean_curve(got)
            row = {"method": m, "schedule": SCHEDULES.get(m, m), "target_sparsity": target,
                   "sparsity": statistics.mean(x["sparsity"] for x in got), "test_acc": acc, "test_acc_std": std,
                   "test_acc_per_seed": [x["test_acc"] for x in got], "n_seeds": len(got),
                   "train_seconds": sec, "imp_time_ratio": (imp_sec / sec) if imp_sec else None,
                   "curve": curve, "imp_accuracy_threshold": threshold}
            if threshold is not None:
                t, step = time_to_accuracy(curve, threshold)
                row["seconds_to_imp_accuracy"] = t
                row["steps_to_imp_accuracy"] = step
                row["speedup_at_imp_accuracy"] = (imp_sec / t) if t else None
                best = max((p["test_acc"] for p in curve), default=acc)
                row["gap_to_imp_accuracy"] = None if t is not None else threshold - best
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
            out.append({"target_sparsity": t, "method": m, "fixed_budget_speedup": b["imp_time_ratio"],
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
    head = ["target sparsity", "method", "schedule", "sparsity", "seeds", "test acc % (mean ± std)", "train s",
            "IMP time / time (fixed budget)", "s to IMP acc", "speedup at IMP acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines.append(f"| 0% | dense (start of all) | {dense['epochs']} epochs | 0.0000 | {len(dense.get('acc_per_seed', []))} | "
                 f"{_pct(dense['acc'], dense.get('acc_std'))} | {dense['seconds']:.1f} (not counted) | | | |")
    for r in rows:
        ratio = "" if r["imp_time_ratio"] is None or r["method"] == "imp" else f"{r['imp_time_ratio']:.2f}x"
        if r["method"] == "imp" or "seconds_to_imp_accuracy" not in r:
            tta = eq = ""
        elif r["seconds_to_imp_accuracy"] is None:
            tta, eq = f"never ({100 * r['gap_to_imp_accuracy']:.2f} short)", "-"
        else:
            tta, eq = f"{r['seconds_to_imp_accuracy']:.1f}", f"{r['speedup_at_imp_accuracy']:.2f}x"
        lines.append(f"| {100 * r['target_sparsity']:.1f}% | {label(r['method'])} | {r['schedule']} | "
                     f"{r['sparsity']:.4f} | {r['n_seeds']} | {_pct(r['test_acc'], r['test_acc_std'])} | "
                     f"{r['train_seconds']:.1f} | "
                     f"{ratio} | {tta} | {eq} |")
    return "\n".join(lines)


def tickets_table(tickets: Dict[str, Any], dense_acc: float) -> str:
    lines = [f"Sparsest winning ticket (mean accuracy >= dense mean {100 * dense_acc:.2f}%):", "",
             "| method | sparsest winning ticket | sparsities evaluated |", "|---|---|---|"]
    for m, t in tickets.items():
        s = t["sparsest_winning_ticket"]
        pts = ", ".join(f"{100 * p['sparsity']:.1f}% ({100 * p['test_acc']:.2f})" for p in t["evaluated"])
        lines.append(f"| {label(m)} | {'none' if s is None else f'{100 * s:.1f}%'} | {pts} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plots(out_dir: str, rows, results, dense: Dict[str, Any], title: str, methods: Sequence[str]) -> List[str]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [m for m in methods if m != "imp"]
    paths = []
    rounds = sorted({rec["round"] for res in results.get("imp", []) for rec in res["records"]})
    imp_pts = []
    for rnd in rounds:
        recs = _imp_at(results, rnd)
        acc, std = mean_std([x["test_acc"] for x in recs])
        imp_pts.append((statistics.mean(x["sparsity"] for x in recs), acc, std or 0.0,
                        statistics.mean(x["cum_train_seconds"] for x in recs)))

    # accuracy (with error bars) and time against sparsity
    for kind, ylabel, fname in (("time", "training time (s, log scale)", "time_vs_sparsity.png"),
                                ("acc", "test accuracy (%)", "accuracy_vs_sparsity.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if imp_pts:
            xs = [100 * p[0] for p in imp_pts]
            if kind == "time":
                ax.plot(xs, [p[3] for p in imp_pts], "o-", label="IMP (all rounds)")
            else:
                ax.errorbar(xs, [100 * p[1] for p in imp_pts], yerr=[100 * p[2] for p in imp_pts], fmt="o-",
                            capsize=3, label="IMP (all rounds)")
        for m in others:
            pts = [r for r in rows if r["method"] == m]
            if not pts:
                continue
            xs = [100 * r["sparsity"] for r in pts]
            if kind == "time":
                ax.plot(xs, [r["train_seconds"] for r in pts], "s-", label=label(m))
            else:
                ax.errorbar(xs, [100 * r["test_acc"] for r in pts], yerr=[100 * (r["test_acc_std"] or 0.0) for r in pts],
                            fmt="s-", capsize=3, label=label(m))
        if kind == "time":
            ax.set_yscale("log")
            ax.axhline(dense["seconds"], color="gray", ls="--", lw=1, label="dense pretraining (not counted)")
        else:
            ax.axhline(100 * dense["acc"], color="gray", ls="--", lw=1, label="dense")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(out_dir, fname)
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    # accuracy against training time, one panel per target sparsity
    fig, axes = plt.subplots(1, len(TARGET_ROUNDS), figsize=(4.2 * len(TARGET_ROUNDS), 4.0), squeeze=False)
    for ax, rnd in zip(axes[0], TARGET_ROUNDS):
        t = target_sparsity(rnd)
        sub = [p for p in imp_pts if p[0] <= t + 1e-3]
        if sub:
            ax.plot([p[3] for p in sub], [100 * p[1] for p in sub], "o-", color="k", label="IMP rounds")
        for m in others:
            r = next((x for x in rows if x["method"] == m and abs(x["target_sparsity"] - t) < 1e-9), None)
            if r is None or not r.get("curve"):
                continue
            ax.plot([p["train_seconds"] for p in r["curve"]], [100 * p["test_acc"] for p in r["curve"]], ".-",
                    label=label(m))
        imp_row = next((x for x in rows if x["method"] == "imp" and abs(x["target_sparsity"] - t) < 1e-9), None)
        if imp_row is not None:
            thr = imp_row["test_acc"] - (imp_row["test_acc_std"] or 0.0)
            ax.axhline(100 * thr, color="k", ls=":", lw=1, label="IMP mean - std")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training time (s, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{100 * t:.1f}% sparsity", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = os.path.join(out_dir, "accuracy_vs_time.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
