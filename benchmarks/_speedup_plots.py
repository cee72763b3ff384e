"""Plots of ``benchmarks/speedup.py``: accuracy and time against sparsity, and accuracy against
training cost per target (pure functions of the rows and run records, like ``_speedup_report``)."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any, Dict, List, Sequence

try:  # imported as part of a package (python -m benchmarks.speedup)
    from ._speedup_report import _imp_at, label, mean_std, target_sparsity
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _speedup_report import _imp_at, label, mean_std, target_sparsity  # type: ignore[no-redef]


def plots(out_dir: str, rows, results, dense: Dict[str, Any], title: str, methods: Sequence[str],
          targets: Sequence[int]) -> List[str]:
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

    # accuracy against training cost (calibrated where measured), one panel per target sparsity;
    # the accuracy that decides (validation where the preset has it) against IMP's mean
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 4.0), squeeze=False)
    for ax, rnd in zip(axes[0], targets):
        t = target_sparsity(rnd)
        imp_row = next((x for x in rows if x["method"] == "imp" and abs(x["target_sparsity"] - t) < 1e-9), None)
        key = imp_row["decided_on"] if imp_row is not None else "test_acc"
        cal = imp_row is not None and imp_row.get("cost_seconds") is not None
        xkey = "cost_seconds" if cal else "train_seconds"
        imp_rows = [x for x in rows if x["method"] == "imp" and x["target_sparsity"] <= t + 1e-9]
        if imp_rows:
            ax.plot([x["cost_seconds" if cal else "train_seconds"] for x in imp_rows],
                    [100 * x[key] for x in imp_rows], "o-", color="k", label="IMP (targets)")
        for m in others:
            r = next((x for x in rows if x["method"] == m and abs(x["target_sparsity"] - t) < 1e-9), None)
            if r is None or not r.get("curve") or not all(p.get(xkey) is not None and key in p for p in r["curve"]):
                continue
            ax.plot([p[xkey] for p in r["curve"]], [100 * p[key] for p in r["curve"]], ".-", label=label(m))
        if imp_row is not None:
            ax.axhline(100 * imp_row[key], color="k", ls=":", lw=1, label="IMP mean")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(("calibrated cost" if cal else "training time") + " (s, log scale)")
        ax.set_ylabel(("validation" if key == "val_acc" else "test") + " accuracy (%)")
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
