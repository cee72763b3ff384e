"""ONNX Runtime latency of a dense and a compacted model, for ``benchmarks/compact.py``.

Both models are written with :func:`bip_fast.export_onnx` (checked with ONNX Runtime on the
example input) into a temporary folder and loaded into one ONNX Runtime CPU session each
(``intra_op_num_threads`` = ``threads``, one inter-op thread, sequential execution, all graph
optimisations). Per batch size, before timing, each session's outputs are checked against its
PyTorch model on that batch (max abs diff <= 1e-4 x the output scale). Then the two are timed
interleaved in this process (:func:`_timing.interleaved`, the protocol of benchmarks/speedup.py's
calibration): rounds of one chunk of each kind in a shuffled order, the first round discarded, a
kind's figure the median over its chunks of the per-call time; a chunk is as many calls as fill
``chunk_seconds`` of the dense model (median of 3 calls after a warm-up call), 1 to 64.

Usage (what compact.py would call per model, with its own dense and compacted models)::

    from benchmarks._onnx_latency import onnx_latency_rows
    rows = onnx_latency_rows(dense, small, example, batches=(1, 16), rounds=15)
    # [{"runtime": "onnxruntime", "batch": 1, "dense_ms": ..., "compact_ms": ..., "latency_ratio": ...}, ...]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn

try:  # imported as part of a package (python -m benchmarks.compact)
    from . import _common as C
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]

import bip_fast

__all__ = ["onnx_latency_rows", "ort_session"]

CPU = torch.device("cpu")


def ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _runner(sess, x: torch.Tensor) -> Callable[[], Any]:
    name = sess.get_inputs()[0].name
    feed = {name: x.numpy()}
    return lambda: sess.run(None, feed)


def _check(sess, model: nn.Module, x: torch.Tensor, what: str) -> float:
    """Max abs diff of the session's first output against ``model(x)``; ValueError beyond 1e-4 x scale."""
    with torch.no_grad():
        want = model.eval()(x)
    want = want if isinstance(want, torch.Tensor) else next(iter(want.values() if isinstance(want, dict) else want))
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    diff = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    if not diff <= 1e-4 * scale + 1e-12:
        raise ValueError(f"{what}: ONNX Runtime differs from PyTorch by {diff:.3g} (scale {scale:.3g}) at batch "
                         f"{x.shape[0]}")
    return diff


def _calls_per_chunk(fn: Callable[[], Any], chunk_seconds: float) -> int:
    fn()
    est = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        est.append(time.perf_counter() - t0)
    return max(1, min(64, math.ceil(chunk_seconds / max(statistics.median(est), 1e-6))))


def onnx_latency_rows(dense: nn.Module, compacted: nn.Module, example: torch.Tensor, batches: Sequence[int], *,
                      rounds: int = 15, chunk_seconds: float = 0.2, threads: int = 2, seed: int = 0
                      ) -> List[Dict[str, Any]]:
    """Per batch size in ``batches``: {"runtime": "onnxruntime", "batch", "dense_ms", "compact_ms",
    "latency_ratio" (compact / dense), p20/p80 of both, "calls_per_chunk", "rounds", "threads",
    "dense_diff" / "compact_diff" (the pre-timing check)}. ``dense``: a plain (or masked:
    finalized by the export) model; ``compacted``: :func:`bip_fast.compact`'s result; ``example``:
    one CPU input batch (batch >= 2) whose sample shape every timed batch takes. See the module
    notes for the protocol."""
    if example.dim() < 1 or example.shape[0] < 2:
        raise ValueError(f"example: expected a batch of at least 2, got shape {tuple(example.shape)}")
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bip_fast_onnx_") as tmp:
        paths = {"dense": os.path.join(tmp, "dense.onnx"), "compact": os.path.join(tmp, "compact.onnx")}
        models = {"dense": dense, "compact": compacted}
        for kind, model in models.items():
            bip_fast.export_onnx(model, example.cpu(), paths[kind])
        sessions = {kind: ort_session(paths[kind], threads) for kind in models}
        g = torch.Generator().manual_seed(seed)
        for b in batches:
            x = torch.randn((b,) + tuple(example.shape[1:]), generator=g, dtype=example.dtype)
            diffs = {k: _check(sessions[k], models[k], x, k) for k in models}
            fns = {k: _runner(sessions[k], x) for k in models}
            calls = _calls_per_chunk(fns["dense"], chunk_seconds)
            t = C.interleaved({k: C.chunk_timer(f, calls, CPU) for k, f in fns.items()}, rounds=rounds, seed=seed)
            d, c = t["dense"], t["compact"]
            rows.append({"runtime": "onnxruntime", "batch": b, "dense_ms": d.median_ms, "compact_ms": c.median_ms,
                         "latency_ratio": c.median_ms / d.median_ms, "dense_p20_ms": d.p20_ms,
                         "dense_p80_ms": d.p80_ms, "compact_p20_ms": c.p20_ms, "compact_p80_ms": c.p80_ms,
                         "calls_per_chunk": calls, "rounds": rounds, "threads": threads,
                         "dense_diff": diffs["dense"], "compact_diff": diffs["compact"]})
    return rows
