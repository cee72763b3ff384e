"""Paired statistics over seeds for the benchmarks: every method's seed s starts from the dense
model of seed s, so methods compare per seed (differences in accuracy points, a 95% Student-t
interval, how many seeds are positive) and a verdict against a non-inferiority margin."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Optional, Sequence

# A method is non-inferior to a reference when the lower end of the 95% t-interval of its per-seed
# differences (accuracy points) is above -NONINFERIORITY_MARGIN, better when it is above 0.
NONINFERIORITY_MARGIN = 1.0


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t as student_t
    return float(student_t.ppf(q, df))


def paired(diffs: Dict[int, float], margin: float = NONINFERIORITY_MARGIN) -> Optional[Dict[str, Any]]:
    """Paired differences (accuracy points, per seed): mean, 95% t-interval, how many seeds are
    positive, and the verdict: "better" (interval above 0), "non-inferior" (above -margin),
    "worse" (below 0, not non-inferior), else "inconclusive". One seed: no interval."""
    if not diffs:
        return None
    seeds = sorted(diffs)
    d = [diffs[s] for s in seeds]
    n = len(d)
    mean = statistics.mean(d)
    out: Dict[str, Any] = {"mean": mean, "n": n, "positive": sum(x > 0 for x in d), "seeds": seeds,
                           "per_seed": d, "units": "accuracy points", "margin": margin}
    if n < 2:
        out.update(ci95=None, verdict="one seed: no interval")
        return out
    half = t_quantile(0.975, n - 1) * statistics.stdev(d) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    out["ci95"] = [lo, hi]
    out["verdict"] = ("better" if lo > 0 else "non-inferior" if lo > -margin else "worse" if hi < 0
                      else "inconclusive")
    return out


def by_seed(runs: Sequence[Dict[str, Any]], key: str) -> Dict[int, float]:
    return {r["seed"]: r[key] for r in runs if r.get(key) is not None}


def paired_diff(a: Dict[int, float], b: Dict[int, float]) -> Dict[int, float]:
    """100 x (a - b) on the seeds both have."""
    return {s: 100.0 * (a[s] - b[s]) for s in a if s in b}
