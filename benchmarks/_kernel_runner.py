"""The measuring harness of ``benchmarks/kernels.py``: the Runner (timing budget, result rows,
error rows), interleaved timing, the checks against the reference and the choice of backends."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:  # imported as part of a package (python -m benchmarks.kernels)
    from . import _common as C
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]


class CorrectnessError(RuntimeError):
    """A backend disagrees with the reference on the benchmark inputs: the run is aborted."""


class Runner:
    """Holds device, timing budget and result rows; runs one guarded measurement at a time."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.rows: List[C.Row] = []
        self.errors: List[Dict[str, str]] = []
        self.gpu = device.type == "cuda"

    def time(self, fn: Callable[[], Any], *, slow: bool = False, warmup: Optional[int] = None) -> C.Timing:
        """``slow``: baselines and reference paths that take ~1 s per call on a 2-core CPU get
        fewer repeats. ``warmup``: override (0 where the correctness call already warmed up)."""
        a = self.args
        if slow:
            return C.bench(fn, self.device, warmup=1 if warmup is None else warmup, repeats=a.slow_repeats,
                           max_seconds=a.max_seconds / 2, min_repeats=min(3, a.slow_repeats))
        return C.bench(fn, self.device, warmup=a.warmup if warmup is None else warmup, repeats=a.repeats,
                       max_seconds=a.max_seconds, min_repeats=min(3, a.repeats))

    def add(self, row: C.Row) -> C.Row:
        self.rows.append(row)
        t = row.timing
        ms = f"{t.median_ms:.3f} ms (n={t.n})" if t else ""
        C.log(f"  {row.op:<28} {row.backend:<22} {row.config:<34} {ms} {row.metric}")
        return row

    def error(self, op: str, backend: str, config: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        self.errors.append({"op": op, "backend": backend, "config": config, "error": msg})
        self.rows.append(C.Row(op, backend, config, metric=f"error: {msg}"))
        C.log(f"  {op} [{backend}] {config}: skipped, {msg}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def _check_masks(name: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    if len(got) != len(want):
        raise CorrectnessError(f"{name}: {len(got)} masks, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype != torch.bool or g.shape != w.shape or not torch.equal(g, w):
            diff = int((g.to(torch.bool) != w).sum()) if g.shape == w.shape else -1
            raise CorrectnessError(f"{name}: mask {i} {tuple(w.shape)} differs from the reference in {diff} entries")


def select_backends(requested: Optional[str], device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """Backends to benchmark and, for requested ones that cannot run, the reason."""
    from bip_fast.ops import _dispatch

    skipped: Dict[str, str] = {}
    if requested:
        names = [b.strip() for b in requested.split(",") if b.strip()]
        out = []
        for b in names:
            if b not in _dispatch.BACKENDS:
                raise SystemExit(f"--backends: unknown backend {b!r}; expected some of {_dispatch.BACKENDS}")
            ok, reason = _dispatch.backend_status(b, device)
            if ok:
                out.append(b)
            else:
                skipped[b] = reason
        return out, skipped
    out = list(_dispatch.available_backends(device))
    if device.type == "cpu" and "triton" in out:
        # The Triton interpreter is a correctness tool; its timings mean nothing.
        out.remove("triton")
        skipped["triton"] = "Triton interpreter on CPU is not benchmarked by default (name it in --backends)"
    for b in _dispatch.BACKENDS:
        if b not in out and b not in skipped:
            ok, reason = _dispatch.backend_status(b, device)
            if not ok:
                skipped[b] = reason
    return out, skipped


def _time_interleaved(r: Runner, calls: List[Callable[[], Any]]) -> List[C.Timing]:
    """Time several calls against each other. On a GPU each gets its own C.bench (CUDA events,
    independent of host state). On a CPU they run interleaved, one call of each per round, so
    all see the same allocator, cache and frequency state (a CPU layer's time can jump 2x between
    runs with the allocator's page-fault behaviour; interleaving keeps the ratios honest)."""
    if r.gpu:
        return [r.time(c) for c in calls]
    for c in calls:  # warm-up
        for _ in range(max(r.args.warmup, 1)):
            c()
    samples: List[List[float]] = [[] for _ in calls]
    for _ in range(r.args.repeats):
        for i, c in enumerate(calls):
            t0 = time.perf_counter()
            c()
            samples[i].append((time.perf_counter() - t0) * 1e3)
    return [C.Timing.from_samples(xs, "perf_counter, interleaved") for xs in samples]
