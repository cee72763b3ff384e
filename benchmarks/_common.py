"""Shared helpers for the benchmark scripts: environment header, timing, tables, JSON.

Timing rules (STYLE.md "Benchmarks"):
  * warm-up, compilation and autotuning run before the first timed call and are never counted;
  * CUDA work is timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)
    when triton imports, else with CUDA events around each call after an L2-sized flush;
  * CPU work is timed with ``time.perf_counter`` around each call;
  * every figure is reported as the median with the 20th and 80th percentiles.

The memory ceiling is measured, not taken from a data sheet: a large ``copy_`` (bytes read +
written per second) and a large ``sum()`` (bytes read per second).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "Timing",
    "Row",
    "git_commit",
    "device_name",
    "device_slug",
    "environment",
    "format_header",
    "synchronize",
    "bench",
    "measure_bandwidth",
    "markdown_table",
    "write_json",
]


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def git_commit(root: str = REPO_ROOT) -> Dict[str, Any]:
    """{"commit": short hash or "unknown", "dirty": bool or None} of the working tree."""
    out: Dict[str, Any] = {"commit": "unknown", "dirty": None}
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip() or "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device) -> str:
    """File-name friendly device id: "cpu", or the GPU name ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def _triton_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # not installed
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Everything needed to reproduce or compare a result file."""
    env: Dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    env.update(git_commit())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    try:
        import bip_fast

        info = bip_fast.build_info()
        env["bip_fast_build"] = dict(info)
    except Exception as e:  # the header must print even when the package is half built
        env["bip_fast_build"] = {"error": f"{type(e).__name__}: {e}"}
    return env


def format_header(env: Dict[str, Any], title: str) -> str:
    dirty = "" if not env.get("dirty") else " (dirty tree)"
    lines = [
        f"# {title}",
        "",
        f"- device: {env['device_name']} ({env['device']})",
        f"- torch {env['torch']}, triton {env['triton'] or 'not installed'}, python {env['python']}",
        f"- commit: {env['commit']}{dirty}",
        f"- CPU: {env['cpu_model']}, {env['cpu_count']} cores usable, torch threads {env['torch_threads']}",
    ]
    if "cuda" in env:
        lines.append(
            f"- CUDA {env['cuda']}, capability {env['capability']}, {env['sm_count']} SMs, "
            f"{env['gpu_memory_gib']} GiB, TF32 matmul={env['tf32_matmul']}"
        )
    build = env.get("bip_fast_build") or {}
    if build:
        scalars = {k: v for k, v in build.items() if isinstance(v, (str, int, float, bool, type(None)))}
        lines.append("- bip_fast build: " + ", ".join(f"{k}={v}" for k, v in scalars.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile over ``n`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    method: str

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], method: str) -> "Timing":
        xs = sorted(samples_ms)
        return cls(statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs), method)


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted ``xs`` (numpy's default)."""
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: Dict[int, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _L2_FLUSH.get(idx)
    if buf is None:
        buf = _L2_FLUSH[idx] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def bench(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 10,
    max_seconds: float = 5.0,
    min_repeats: int = 3,
) -> Timing:
    """Time ``fn()`` per call on ``device``; warm-up calls are run first and not counted.

    CPU: at least ``min_repeats`` and at most ``repeats`` timed calls, stopping early once
    ``max_seconds`` of timed calls have accumulated (so slow baselines get fewer repeats); one
    warm-up call that alone takes over a quarter of ``max_seconds`` ends the warm-up.
    CUDA: ``triton.testing.do_bench`` with a time budget derived from the same numbers
    (it flushes L2 between calls, so every call starts from cold cache like in training).
    """
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        # A CPU call that takes a large part of the budget is warm after one call: no more.
        if device.type != "cuda" and time.perf_counter() - t0 > max_seconds / 4:
            break
    synchronize(device)
    if device.type == "cuda":
        return _bench_cuda(fn, device, repeats=repeats, max_seconds=max_seconds, min_repeats=min_repeats)
    samples: List[float] = []
    spent = 0.0
    while len(samples) < repeats and (len(samples) < min_repeats or spent < max_seconds):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3)
        spent += dt
    return Timing.from_samples(samples, "perf_counter")


def _bench_cuda(fn, device, *, repeats: int, max_seconds: float, min_repeats: int) -> Timing:
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken: CUDA events directly
        do_bench = None
    if do_bench is not None:
        # do_bench picks its repeat count from a time budget (ms): estimate it from one call.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end), 1e-3)
        rep_ms = min(max(est * repeats, 20.0), max_seconds * 1e3)
        rep_ms = max(rep_ms, est * min_repeats)
        times = do_bench(fn, warmup=1, rep=rep_ms, return_mode="all")
        return Timing.from_samples([float(t) for t in times], "triton.do_bench")
    samples: List[float] = []
    spent = 0.0
    while len(samples) < repeats and (len(samples) < min_repeats or spent < max_seconds):
        _flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        samples.append(start.elapsed_time(end))
        spent += samples[-1] / 1e3
    return Timing.from_samples(samples, "cuda_events")


def measure_bandwidth(device: torch.device, nbytes: Optional[int] = None, *, repeats: int = 20) -> Dict[str, Any]:
    """Measured memory ceiling: ``copy_`` (read + write bytes / s) and ``sum()`` (read bytes / s).

    The buffer is much larger than any cache (1 GiB on CUDA, 256 MiB on CPU by default).
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), device, warmup=2, repeats=repeats, max_seconds=2.0)
    t_sum = bench(lambda: src.sum(), device, warmup=2, repeats=repeats, max_seconds=2.0)
    copy_gbs = 2 * nbytes / (t_copy.median_ms * 1e-3) / 1e9
    read_gbs = nbytes / (t_sum.median_ms * 1e-3) / 1e9
    del src, dst
    return {
        "bytes": nbytes,
        "copy_ms": asdict(t_copy),
        "sum_ms": asdict(t_sum),
        "copy_gbs": copy_gbs,  # bytes read + written per second
        "read_gbs": read_gbs,  # bytes read per second (sum)
    }


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
