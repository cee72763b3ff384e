"""Result rows of the benchmark scripts, their markdown table and the JSON result file (reached
through ``_common``, which re-exports them)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

try:  # imported as part of a package (python -m benchmarks.<script>)
    from ._timing import Timing
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import Timing  # type: ignore[no-redef]


@dataclass
class Row:
    """One table line; ``targets`` holds {"name", "value", "threshold", "op", "passed"} dicts."""

    op: str
    backend: str
    config: str
    timing: Optional[Timing] = None
    metric: str = ""  # the "GB/s or ratio" column, human readable
    metrics: Dict[str, float] = field(default_factory=dict)
    targets: List[Dict[str, Any]] = field(default_factory=list)

    def add_target(self, name: str, value: float, op: str, threshold: float) -> None:
        checks = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold, "<": value < threshold}
        if op not in checks:
            raise ValueError(f"op: expected one of {sorted(checks)}, got {op!r}")
        passed = checks[op]
        self.targets.append({"name": name, "value": value, "op": op, "threshold": threshold, "passed": bool(passed)})

    @property
    def passed(self) -> Optional[bool]:
        if not self.targets:
            return None
        return all(t["passed"] for t in self.targets)

    def to_json(self) -> Dict[str, Any]:
        d = {
            "op": self.op,
            "backend": self.backend,
            "config": self.config,
            "median_ms": self.timing.median_ms if self.timing else None,
            "p20_ms": self.timing.p20_ms if self.timing else None,
            "p80_ms": self.timing.p80_ms if self.timing else None,
            "repeats": self.timing.n if self.timing else None,
            "timing_method": self.timing.method if self.timing else None,
            "metric": self.metric,
            "metrics": self.metrics,
            "targets": self.targets,
            "passed": self.passed,
        }
        return d


def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return ""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_target(t: Dict[str, Any]) -> str:
    return f"{t['name']} {t['op']} {t['threshold']:g}"


def markdown_table(rows: Sequence[Row]) -> str:
    header = ["op", "backend", "config", "median ms", "p20", "p80", "GB/s or ratio", "target", "pass"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        t = r.timing
        verdict = "" if r.passed is None else ("pass" if r.passed else "FAIL")
        cells = [
            r.op,
            r.backend,
            r.config,
            _fmt_ms(t.median_ms if t else None),
            _fmt_ms(t.p20_ms if t else None),
            _fmt_ms(t.p80_ms if t else None),
            r.metric,
            "; ".join(_fmt_target(x) for x in r.targets),
            verdict,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (torch.device, torch.dtype)):
        return str(x)
    return repr(x)


def write_json(path: str, *, benchmark: str, env: Dict[str, Any], config: Dict[str, Any], rows: Sequence[Row],
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write {benchmark, device, versions, commit, env, config, rows, summary} to ``path``."""
    rows_json = [r.to_json() for r in rows]
    judged = [r for r in rows_json if r["passed"] is not None]
    doc: Dict[str, Any] = {
        "benchmark": benchmark,
        "schema": 1,
        "device": env.get("device_name"),
        "versions": {"torch": env.get("torch"), "triton": env.get("triton"), "python": env.get("python")},
        "commit": env.get("commit"),
        "env": env,
        "config": config,
        "rows": rows_json,
        "summary": {
            "rows": len(rows_json),
            "judged": len(judged),
            "passed": sum(1 for r in judged if r["passed"]),
            "failed": sum(1 for r in judged if not r["passed"]),
        },
    }
    if extra:
        doc.update(extra)
    doc = _jsonable(doc)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return doc
