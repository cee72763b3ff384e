"""Timing for the benchmark scripts (reached through ``_common``, which re-exports it).

Timing rules (STYLE.md "Benchmarks"):
  * warm-up, compilation and autotuning run before the first timed call and are never counted;
  * CUDA work is timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)
    when triton imports, else with CUDA events around each call after an L2-sized flush;
  * CPU work is timed with ``time.perf_counter`` around each call;
  * every figure is reported as the median with the 20th and 80th percentiles;
  * things compared with each other on a shared or drifting machine are timed interleaved in one
    process (:func:`interleaved`: the protocol of benchmarks/speedup.py's calibration), so that
    a neighbour that wakes up or a clock that drifts moves every kind alike.

The memory ceiling is measured, not taken from a data sheet: a large ``copy_`` (bytes read +
written per second) and a large ``sum()`` (bytes read per second).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


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


INTERLEAVED = ("interleaved: {rounds} rounds + 1 warm-up round discarded; in each round one chunk of every "
               "kind, in an order shuffled per round (random.Random({seed})); a kind's figure is the median "
               "(p20/p80) over its chunks of the per-call time of the chunk; one process")


def chunk_timer(fn: Callable[[], Any], calls: int, device: torch.device) -> Callable[[], float]:
    """A chunk of ``calls`` calls of ``fn()`` timed with ``time.perf_counter`` (synchronised on
    CUDA); returns seconds per call."""
    def run() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        return (time.perf_counter() - t0) / calls
    return run


def interleaved(chunks: Dict[str, Callable[[], float]], *, rounds: int = 15, seed: int = 0) -> Dict[str, Timing]:
    """Time every kind of ``chunks`` (name -> a function that runs one chunk and returns its
    seconds per call, e.g. :func:`chunk_timer`) interleaved: ``rounds`` + 1 rounds, one chunk of
    every kind per round in a shuffled order, the first round discarded (it warms every kind up);
    a kind's :class:`Timing` (ms) is the median, p20 and p80 over its ``rounds`` chunks."""
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    rng = random.Random(seed)
    per: Dict[str, List[float]] = {k: [] for k in chunks}
    for r in range(rounds + 1):
        order = list(chunks)
        rng.shuffle(order)
        for k in order:
            t = chunks[k]()
            if r > 0:
                per[k].append(t * 1e3)
    method = INTERLEAVED.format(rounds=rounds, seed=seed)
    return {k: Timing.from_samples(v, method) for k, v in per.items()}
