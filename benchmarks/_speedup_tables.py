"""Markdown tables of ``benchmarks/speedup.py`` (pure functions of the rows, the tuning record and
the winning tickets that ``_speedup_report`` computes)."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence

try:  # imported as part of a package (python -m benchmarks.speedup)
    from ._speedup_report import label
    from ._speedup_stats import NONINFERIORITY_MARGIN, paired, paired_diff
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _speedup_report import label  # type: ignore[no-redef]
    from _speedup_stats import NONINFERIORITY_MARGIN, paired, paired_diff  # type: ignore[no-redef]


def pct(x: Optional[float], std: Optional[float] = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def paired_str(p: Optional[Dict[str, Any]]) -> str:
    """"+0.65 [+0.21, +1.09] 5/5" (points, 95% interval, seeds positive of n)."""
    if not p:
        return ""
    ci = "" if p.get("ci95") is None else f" [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
    return f"{p['mean']:+.2f}{ci} {p['positive']}/{p['n']}"


def _speedup_str(r: Dict[str, Any]) -> str:
    if r.get("speedup_at_imp_accuracy") is None:
        return "never" if r.get("steps_to_imp_accuracy", 0) is None else "n/a"
    s = f"{r['speedup_at_imp_accuracy']:.2f}x"
    ci = (r.get("speedup_at_imp_accuracy_ci90") or {}).get("ci90")
    if ci:
        lo = "never" if ci[0] is None else f"{ci[0]:.1f}x"
        hi = "never" if ci[1] is None else f"{ci[1]:.1f}x"
        s += f" [{lo}, {hi}]"
    return s


def table(rows: List[Dict[str, Any]], dense: Dict[str, Any]) -> str:
    """Markdown table: accuracy (validation, test), cost (calibrated s, wall s), the fixed-budget
    cost ratio against IMP and the cost to reach IMP's accuracy (with the test accuracy there)."""
    head = ["target sparsity", "method", "schedule", "structure", "sparsity", "seeds", "val acc %",
            "test acc % (mean ± std)", "vs IMP, paired (points, 95% CI, seeds +)", "vs dense, paired",
            "cost s", "wall s", "IMP cost / cost (fixed budget)", "cost s to IMP val acc (test acc % there)",
            "speedup at IMP acc [90% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines.append(f"| 0% | dense (start of all) | {dense['epochs']} epochs | | 0.0000 | "
                 f"{len(dense.get('acc_per_seed', []))} | "
                 f"{pct(dense.get('val_acc'), dense.get('val_acc_std'))} | {pct(dense['acc'], dense.get('acc_std'))} | "
                 f"| | | {dense['seconds']:.1f} (not counted) | | | |")

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
            ta = r.get("test_acc_at_imp_accuracy")
            tta = f"{t:.1f} ({'n/a' if ta is None else f'{100 * ta:.2f}'})"
            eq = _speedup_str(r)
        lines.append(f"| {100 * r['target_sparsity']:.1f}% | {label(r['method'])} | {r['schedule']} | "
                     f"{r.get('structure', '')} | {r['sparsity']:.4f} | {r['n_seeds']} | "
                     f"{pct(r.get('val_acc'), r.get('val_acc_std'))} | {pct(r['test_acc'], r['test_acc_std'])} | "
                     f"{paired_str(r.get('paired_vs_imp'))} | {paired_str(r.get('paired_vs_dense'))} | "
                     f"{sec(r.get('cost_seconds'))} | {r['train_seconds']:.1f} | {ratio} | {tta} | {eq} |")
    return "\n".join(lines)


def headline_table(rows: List[Dict[str, Any]], methods: Sequence[str]) -> str:
    """Compact markdown table of ``methods`` (IMP first): test accuracy, the paired difference to
    IMP (95% interval, seeds positive) and its verdict, the paired difference to dense, calibrated
    cost, the fixed-budget cost ratio and the speedup at IMP's validation accuracy (90% interval)."""
    head = ["sparsity", "method", "test acc %", "vs IMP (points, 95% CI, seeds +)", "verdict vs IMP",
            "vs dense (points, 95% CI)", "cost s", "IMP cost / cost", "speedup at IMP val acc [90% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["method"] not in methods:
            continue
        cost = r.get("cost_seconds")
        fixed = "" if r["method"] == "imp" or r.get("imp_cost_ratio") is None else f"{r['imp_cost_ratio']:.2f}x"
        eq = "" if r["method"] == "imp" else _speedup_str(r)
        pv = r.get("paired_vs_imp")
        lines.append(f"| {100 * r['target_sparsity']:.1f}% | {label(r['method'])} | "
                     f"{pct(r['test_acc'], r['test_acc_std'])} | {paired_str(pv)} | "
                     f"{'' if not pv else pv['verdict']} | {paired_str(r.get('paired_vs_dense'))} | "
                     f"{'n/a' if cost is None else f'{cost:.1f}'} | {fixed} | {eq} |")
    return "\n".join(lines)


def pairs_table(rows: List[Dict[str, Any]], ref: str, others: Sequence[str],
                labels: Optional[Dict[str, str]] = None) -> str:
    """``ref`` against each of ``others``, per target: test accuracy of ``ref`` minus the other's on
    the same seed (they start from the same dense model), points, 95% t-interval, seeds positive,
    verdict (``_speedup_stats.paired``, computed here from the rows' per-seed accuracies).
    ``labels``: method -> name (default: the speedup benchmark's names)."""
    def name(m: str) -> str:
        return (labels or {}).get(m) or label(m)

    def per_seed(r: Dict[str, Any]) -> Dict[int, float]:
        return dict(zip(r["seeds"], r["test_acc_per_seed"]))

    at: Dict[float, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        at.setdefault(round(r["target_sparsity"], 4), {})[r["method"]] = r
    out = ["| sparsity | " + " | ".join(f"{name(ref)} vs {name(m)}" for m in others) + " |",
           "|---|" + "---|" * len(others)]
    for t in sorted(at):
        if ref not in at[t]:
            continue
        cells = []
        for m in others:
            p = paired(paired_diff(per_seed(at[t][ref]), per_seed(at[t][m]))) if m in at[t] else None
            cells.append(f"{paired_str(p)} {p['verdict']}" if p else "")
        out.append(f"| {100 * t:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(out)


def control_line(ctrl: Dict[str, Any]) -> str:
    """The control row in words (dense, IMP-round and OMP steps are the same SGD step and must cost
    the same); "" when neither accounting has a spread yet."""
    if ctrl.get("max_rel_diff") is None and ctrl.get("wall_max_rel_diff") is None:
        return ""

    def fmt(d):
        return "n/a" if d is None else f"{100 * d:.1f}%"

    cal = ", ".join(f"{k} {1000 * v:.1f}" for k, v in (ctrl.get("s_per_step") or {}).items()) or "not measured yet"
    wall = ", ".join(f"{k} {1000 * v:.1f}" for k, v in (ctrl.get("wall_s_per_step") or {}).items())
    paired = ("" if ctrl.get("round_paired_max_rel_diff") is None
              else f"; paired within rounds {fmt(ctrl['round_paired_max_rel_diff'])}")
    return (f"control (the same SGD step): calibrated ms/step {cal} (spread {fmt(ctrl.get('max_rel_diff'))}{paired}, "
            f"agree within {100 * ctrl.get('limit', 0.05):.0f}%: {ctrl.get('calibrated_agree')}); wall-clock ms/step "
            f"{wall} (spread {fmt(ctrl.get('wall_max_rel_diff'))}, agree: {ctrl.get('wall_agree')})")


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
            lines.append(f"| {label(m)} | {_cfg(c['config'])} | {pct(c['val_acc'])} | {pct(c['test_acc'])} | "
                         f"{'yes' if c['config'] == t['chosen'] else ''} |")
    return "\n".join(lines)


def _cfg(c: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items())


def tickets_table(tickets: Dict[str, Any], dense_acc: float) -> str:
    lines = [f"Sparsest winning ticket (paired 95% interval vs the same seed's dense model above "
             f"-{NONINFERIORITY_MARGIN:g} point; dense mean {100 * dense_acc:.2f}%):", "",
             "| method | sparsest winning ticket | targets (test acc %, vs dense: points [95% CI]) |", "|---|---|---|"]
    for m, t in tickets.items():
        s = t["sparsest_winning_ticket"]
        pts = ", ".join(f"{100 * p['target_sparsity']:.1f}% ({100 * p['test_acc']:.2f}, "
                        f"{paired_str(p.get('paired_vs_dense')) or 'n/a'})" for p in t["evaluated"])
        lines.append(f"| {label(m)} | {'none' if s is None else f'{100 * s:.1f}%'} | {pts} |")
    return "\n".join(lines)
