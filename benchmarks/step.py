"""Per-iteration time of BiP against a dense SGD step and against an authors'-shaped iteration.

Modes, each on a fresh copy of the same model (bip_fast.models.build), batch 128:

- ``dense``: forward, backward, ``torch.optim.SGD`` step on the plain model (the yardstick);
- ``bip_alternating`` / ``bip_fused`` / ``bip_official``: ``bip_fast.BiP(...).step`` (90% sparsity);
- ``bip_fused_unguarded``: ``bip_fused`` without the divergence guard (its cost is the difference);
- ``authors_shaped``: the iteration of benchmarks/authors_shaped.py (4 forward + 3 backward, a
  full sort of all scores and a rebuild of every masked weight per forward, torch.cat flattening).

Inputs are random tensors (timing only; no accuracy is measured here). Warm-up calls are excluded;
GPU time comes from CUDA events (``_common.bench``: triton.testing.do_bench), CPU time from
perf_counter. Reported: median, p20, p80 ms per iteration, the ratio to the dense step and the
speedup over the authors'-shaped iteration. Targets: alternating <= 2.1x dense, fused <= 1.15x
dense, each BiP mode >= 4x faster than the authors'-shaped iteration.

    python benchmarks/step.py [--device cpu|cuda] [--quick] [--models resnet20,resnet18,vgg16_bn]
"""

from __future__ import annotations

import argparse
import copy
import time
import os
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

try:  # run as a module (python -m benchmarks.step) or as a script
    from . import _common as C
    from .authors_shaped import AuthorsShapedBiP
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from authors_shaped import AuthorsShapedBiP  # type: ignore[no-redef]

import bip_fast
from bip_fast.models import build

MODES = ("dense", "bip_alternating", "bip_fused", "bip_fused_unguarded", "bip_official", "authors_shaped")
DEFAULT_MODELS = ("resnet20", "resnet18", "vgg16_bn")
SPARSITY = 0.9
TARGETS = {"bip_alternating": ("ratio_to_dense", "<=", 2.1), "bip_fused": ("ratio_to_dense", "<=", 1.15)}
SPEEDUP_TARGET = 4.0


def _model_name(name: str) -> str:
    return "vgg16_bn" if name.lower() in ("vgg16", "vgg-16") else name.lower()


def _make_step(mode: str, base: torch.nn.Module, lower, upper):
    """A zero-argument callable running one iteration of ``mode`` on its own model copy."""
    model = copy.deepcopy(base)
    model.train()
    if mode == "dense":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        x, y = lower

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    if mode == "authors_shaped":
        alg = AuthorsShapedBiP(model, SPARSITY)
        return lambda: alg.step(lower, upper)
    kw: Dict[str, Any] = {"total_steps": 10_000}
    if mode == "bip_official":
        kw.update(variant="official", lr=0.1)
    else:
        kw.update(schedule=mode.split("_")[1])
    alg = bip_fast.BiP(model, SPARSITY, **kw)
    alg.nonfinite_guard = mode != "bip_fused_unguarded"
    return lambda: alg.step(lower, upper)


def _bench_interleaved(name: str, fns: Dict[str, Any], *, warmup: int, repeats: int,
                       max_seconds: float) -> Dict[str, C.Timing]:
    """CPU: one iteration of every mode per round, so all modes see the same machine state
    (allocator, caches, clock, neighbours); a ratio to dense from separate timing windows can
    drift by several percent on a shared 2-core machine. Rounds: at least 3, at most
    ``repeats``, and about ``max_seconds`` per mode in total."""
    first: Dict[str, float] = {}
    for mode, fn in fns.items():
        C.log(f"[step] {name} {mode}: warm-up")
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            fn()
            first[mode] = time.perf_counter() - t0
    per_round = sum(first.values())
    rounds = int(max(3, min(repeats, max_seconds * len(fns) / max(per_round, 1e-9))))
    samples: Dict[str, List[float]] = {m: [] for m in fns}
    for r in range(rounds):
        for mode, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[mode].append((time.perf_counter() - t0) * 1e3)
        C.log(f"[step] {name} round {r + 1}/{rounds}")
    out = {m: C.Timing.from_samples(xs, "perf_counter, interleaved") for m, xs in samples.items()}
    for m, t in out.items():
        C.log(f"[step] {name} {m}: {t.median_ms:.1f} ms (n={t.n})")
    return out


def run(models: List[str], device: torch.device, batch: int, *, warmup: int, repeats: int,
        max_seconds: float, seed: int = 0) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for name in models:
        torch.manual_seed(seed)
        base = build(name).to(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        lower = (torch.randn(batch, 3, 32, 32, generator=g).to(device),
                 torch.randint(0, 10, (batch,), generator=g).to(device))
        upper = (torch.randn(batch, 3, 32, 32, generator=g).to(device),
                 torch.randint(0, 10, (batch,), generator=g).to(device))
        timings = {}
        if device.type == "cuda":
            for mode in MODES:
                fn = _make_step(mode, base, lower, upper)
                C.log(f"[step] {name} {mode} ...")
                t = C.bench(fn, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds, min_repeats=3)
                timings[mode] = t
                C.log(f"[step] {name} {mode}: {t.median_ms:.1f} ms (n={t.n})")
                del fn
        else:
            timings = _bench_interleaved(name, {m: _make_step(m, base, lower, upper) for m in MODES},
                                         warmup=warmup, repeats=repeats, max_seconds=max_seconds)
        dense = timings["dense"].median_ms
        authors = timings["authors_shaped"].median_ms
        for mode, t in timings.items():
            rows.append({
                "model": name, "device": str(device), "mode": mode, "batch": batch,
                "ms_per_iter": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms, "repeats": t.n,
                "timing_method": t.method,
                "ratio_to_dense": t.median_ms / dense,
                "ratio_to_authors_shaped": authors / t.median_ms,
            })
    for r in rows:
        targets = []
        if r["mode"] in TARGETS:
            key, op, thr = TARGETS[r["mode"]]
            targets.append({"name": "x dense", "value": r[key], "op": op, "threshold": thr,
                            "passed": bool(r[key] <= thr)})
        if r["mode"].startswith("bip_"):
            v = r["ratio_to_authors_shaped"]
            targets.append({"name": "speedup vs authors-shaped", "value": v, "op": ">=",
                            "threshold": SPEEDUP_TARGET, "passed": bool(v >= SPEEDUP_TARGET)})
        r["targets"] = targets
        r["passed"] = None if not targets else all(t["passed"] for t in targets)
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    head = ["model", "mode", "ms/iter", "p20", "p80", "x dense", "speedup vs authors-shaped", "targets", "pass"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        tg = "; ".join(f"{t['name']} {t['op']} {t['threshold']:g}" for t in r["targets"])
        verdict = "" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")
        out.append("| " + " | ".join([
            r["model"], r["mode"], C._fmt_ms(r["ms_per_iter"]), C._fmt_ms(r["p20"]), C._fmt_ms(r["p80"]),
            f"{r['ratio_to_dense']:.2f}x", f"{r['ratio_to_authors_shaped']:.2f}x", tg, verdict]) + " |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true", help="ResNet-20 only, batch 32, few repeats")
    p.add_argument("--models", default=None, help=f"comma-separated (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (32 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="max timed iterations per mode")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/step-<device>.json)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    models = [_model_name(m) for m in args.models.split(",")] if args.models else (
        ["resnet20"] if args.quick else list(DEFAULT_MODELS))
    batch = args.batch_size or (32 if args.quick else 128)
    gpu = device.type == "cuda"
    if args.quick:
        warmup, repeats, max_seconds = 1, args.repeats or 3, 1.0
    else:
        # CPU: ResNet-18 / VGG-16 at batch 128 take seconds per iteration on 2 cores: few repeats.
        warmup, repeats, max_seconds = (3, args.repeats or 50, 3.0) if gpu else (1, args.repeats or 5, 6.0)
    env = C.environment(device)
    print(C.format_header(env, "BiP per-iteration time vs dense SGD and the authors'-shaped iteration"))
    print(f"- models {models}, batch {batch}, sparsity {SPARSITY}, random input data (timing only), "
          f"warm-up {warmup} iteration(s) excluded, up to {repeats} timed iterations per mode")
    print()
    for name in models:  # correctness before timing
        torch.manual_seed(0)
        base = build(name).to(device)
        x = torch.randn(4, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (4,), device=device)
        for mode in MODES:
            fn = _make_step(mode, base, (x, y), (x, y))
            fn()
        bip = bip_fast.BiP(copy.deepcopy(base), SPARSITY)
        bip.step((x, y), (x, y))
        if abs(bip.sparsity() - SPARSITY) > 1e-3:
            raise RuntimeError(f"{name}: BiP sparsity {bip.sparsity()} != {SPARSITY}")
    rows = run(models, device, batch, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
    print(table(rows))
    print()
    judged = [r for r in rows if r["passed"] is not None]
    print(f"targets: {sum(r['passed'] for r in judged)}/{len(judged)} rows pass "
          f"(alternating <= 2.1x dense, fused <= 1.15x dense, BiP >= {SPEEDUP_TARGET:g}x faster than authors-shaped)")
    path = args.json or os.path.join(C.RESULTS_DIR, f"step-{C.device_slug(device)}.json")
    config = {"models": models, "batch": batch, "device": str(device), "sparsity": SPARSITY, "warmup": warmup,
              "repeats": repeats, "max_seconds": max_seconds, "quick": args.quick, "data": "random tensors"}
    C.write_json(path, benchmark="step", env=env, config=config, rows=[],
                 extra={"rows": rows, "summary": {"rows": len(rows), "judged": len(judged),
                                                  "passed": sum(1 for r in judged if r["passed"]),
                                                  "failed": sum(1 for r in judged if not r["passed"])}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
