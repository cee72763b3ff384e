"""Report of ``benchmarks/structured.py``: rows (one per method and target, means over the seeds),
the markdown table and the accuracy-against-latency plot (pure functions of the run records)."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

try:  # imported as part of a package (python -m benchmarks.structured)
    from ._speedup_report import mean_std
    from ._speedup_stats import by_seed, paired, paired_diff
    from ._structured_runs import METHODS, label
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _speedup_report import mean_std  # type: ignore[no-redef]
    from _speedup_stats import by_seed, paired, paired_diff  # type: ignore[no-redef]
    from _structured_runs import METHODS, label  # type: ignore[no-redef]


def _mean_dict(ds: Sequence[Dict[str, float]]) -> Dict[str, float]:
    return {k: statistics.mean(d[k] for d in ds) for k in ds[0]}


def aggregate(records: Dict[str, List[Dict[str, Any]]], methods: Sequence[str],
              dense_runs: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """One row per (method, target sparsity) that has records: accuracy mean ± std over the seeds,
    the inference cost (latencies: means of the per-seed medians) and the paired per-seed test
    accuracy differences (``_speedup_stats.paired``) to the same seed's dense model and to IMP of
    the same structure (IMP-F for per-layer filter masks, IMP with group masks for group masks)."""
    rows = []
    dense_test = by_seed(dense_runs, "test_acc")
    imp_of = {METHODS[m][1]: m for m in METHODS if METHODS[m][0] == "imp"}
    for m in methods:
        targets = sorted({r["target_sparsity"] for r in records.get(m, [])})
        for t in targets:
            rs = sorted((r for r in records[m] if r["target_sparsity"] == t), key=lambda r: r["seed"])
            inf = [r["inference"] for r in rs]
            acc, std = mean_std([r["test_acc"] for r in rs])
            vals = [r["val_acc"] for r in rs if r.get("val_acc") is not None]
            val, val_std = mean_std(vals) if vals else (None, None)
            cut = [i["filters_cut"] / max(i["filters_cut"] + i["filters_left_zero"], 1)
                   for i in inf if "filters_cut" in i]
            rows.append({
                "method": m, "label": label(m), "algorithm": METHODS[m][0], "structure": METHODS[m][1],
                "removable": inf[0]["removable"], "target_sparsity": t, "seeds": [r["seed"] for r in rs],
                # records made before per-layer filter masks were compacted: only group masks were
                "compacted": all(i.get("compacted", i["removable"]) for i in inf),
                "zero_filters_cut": statistics.mean(cut) if len(cut) == len(inf) else None,
                "filter_sparsity": statistics.mean(i["filter_sparsity"] for i in inf),
                "weight_sparsity": statistics.mean(r["weight_sparsity"] for r in rs),
                "test_acc": acc, "test_acc_std": std, "test_acc_per_seed": [r["test_acc"] for r in rs],
                "val_acc": val, "val_acc_std": val_std,
                "latency_ms": _mean_dict([i["latency_ms"] for i in inf]),
                "latency_ratio": _mean_dict([i["latency_ratio"] for i in inf]),
                "masked_latency_ms": _mean_dict([i["masked_latency_ms"] for i in inf]),
                "dense_latency_ms": _mean_dict([i["dense_latency_ms"] for i in inf]),
                "macs": statistics.mean(i["macs"] for i in inf), "macs_ratio": statistics.mean(i["macs_ratio"] for i in inf),
                "params": statistics.mean(i["params"] for i in inf),
                "nonzero_params": statistics.mean(i["nonzero_params"] for i in inf),
                "train_seconds": statistics.mean(r["train_seconds"] for r in rs),
                "paired_vs_dense": paired(paired_diff(by_seed(rs, "test_acc"), dense_test)),
            })
            ref = imp_of.get(METHODS[m][1])
            if ref and ref != m:
                imp = [r for r in records.get(ref, []) if abs(r["target_sparsity"] - t) < 1e-9]
                pv = paired(paired_diff(by_seed(rs, "test_acc"), by_seed(imp, "test_acc")))
                rows[-1]["paired_vs_imp"] = pv and dict(pv, reference=ref)
    return rows


def mask_flips(records: Dict[str, List[Dict[str, Any]]], methods: Sequence[str]) -> Dict[str, Any]:
    """How each method's masks move: per method and target, the mean over seeds of the fraction of
    output filters (and of mask entries) whose kept state changed in each tenth of its training
    (``execute(track_masks=10)``); IMP's runs cover all its rounds, so its tenths span every target."""
    out: Dict[str, Any] = {}
    for m in methods:
        runs: Dict[Any, Dict[str, Any]] = {}
        for r in records.get(m, []):
            f = r.get("mask_flips")
            if f and f.get("filters"):
                key = r["seed"] if METHODS[m][0] == "imp" else (r["target_sparsity"], r["seed"])
                runs[key] = dict(f, target_sparsity=None if METHODS[m][0] == "imp" else r["target_sparsity"])
        per: Dict[str, Any] = {}
        for f in runs.values():
            per.setdefault("all targets" if f["target_sparsity"] is None else f"{f['target_sparsity']:g}", []).append(f)
        out[m] = {t: {"filters": _mean_lists([f["filters"] for f in fs]), "entries": _mean_lists([f["entries"] for f in fs]),
                      "runs": len(fs), "last_tenth_filters": _mean_lists([f["filters"] for f in fs])[-1]}
                  for t, fs in sorted(per.items())}
    return out


def _mean_lists(xs: Sequence[Sequence[float]]) -> List[float]:
    n = min(len(x) for x in xs)
    return [statistics.mean(x[i] for x in xs) for i in range(n)]


def _pm(x: float, std: Optional[float], n: int) -> str:
    return f"{100 * x:.2f}" + ("" if std is None else f" ± {100 * std:.2f}") + f" ({n})"


def _masks(r: Dict[str, Any]) -> str:
    where = "group" if r["structure"] == "group" else "per layer"
    if not r.get("compacted", r["removable"]):
        return f"{where}, not removable (masked model timed)"
    if r.get("zero_filters_cut") is None or r["structure"] == "group":
        return f"{where}, compacted"
    return f"{where}, compacted ({100 * r['zero_filters_cut']:.0f}% of zero filters cut)"


def table(rows: List[Dict[str, Any]], dense: Dict[str, Any], batches: Sequence[int]) -> str:
    """Markdown: one line per method and target, the dense model first."""
    bs = [str(b) for b in batches]
    head = (["method", "masks", "target", "filters removed", "test acc % (± std, seeds)"]
            + [f"CPU ms, batch {b} (x dense)" for b in bs] + ["MACs M (x dense)", "params K", "nonzero params K"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    d = dense["cost"]
    lines.append("| " + " | ".join(
        ["dense", "-", "0%", "0%", _pm(dense["acc"], dense.get("acc_std"), len(dense["acc_per_seed"]))]
        + [f"{d['latency_ms'][b]:.2f} (1.00)" for b in bs]
        + [f"{d['macs'] / 1e6:.2f} (1.00)", f"{d['params'] / 1e3:.1f}", f"{d['params'] / 1e3:.1f}"]) + " |")
    for r in rows:
        masks = _masks(r)
        lines.append("| " + " | ".join(
            [r["label"], masks, f"{100 * r['target_sparsity']:.0f}%", f"{100 * r['filter_sparsity']:.1f}%",
             _pm(r["test_acc"], r["test_acc_std"], len(r["seeds"]))]
            + [f"{r['latency_ms'][b]:.2f} ({r['latency_ratio'][b]:.2f})" for b in bs]
            + [f"{r['macs'] / 1e6:.2f} ({r['macs_ratio']:.2f})", f"{r['params'] / 1e3:.1f}",
               f"{r['nonzero_params'] / 1e3:.1f}"]) + " |")
    return "\n".join(lines)


def plot(path: str, rows: List[Dict[str, Any]], dense: Dict[str, Any], batches: Sequence[int], title: str) -> str:
    """Test accuracy against CPU latency (x dense, measured interleaved with the dense model), one
    panel per batch size, one line per method through its targets (solid: group masks, dashed:
    per-layer filter masks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6.0 * len(batches), 4.4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "osD^vP*Xh<>"
    for ax, b in zip(axes[0], [str(b) for b in batches]):
        for i, m in enumerate(methods):
            rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["target_sparsity"])
            xs = [r["latency_ratio"][b] for r in rs]
            ys = [100 * r["test_acc"] for r in rs]
            err = [100 * (r["test_acc_std"] or 0.0) for r in rs]
            style = "-" if rs[0]["structure"] == "group" else "--"
            ax.errorbar(xs, ys, yerr=err, fmt=markers[i % len(markers)] + style, capsize=3, label=label(m))
            for x, y, r in zip(xs, ys, rs):
                ax.annotate(f"{100 * r['target_sparsity']:.0f}%", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.errorbar([1.0], [100 * dense["acc"]], yerr=[100 * (dense.get("acc_std") or 0.0)], fmt="k*", markersize=10,
                    capsize=3, label="dense")
        timed = ("compacted models" if all(r.get("compacted", r["removable"]) for r in rows)
                 else "group masks compacted, filter masks masked")
        ax.set_xlabel(f"CPU latency, batch {b} (x dense; {timed})")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
