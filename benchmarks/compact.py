"""What pruning buys at inference on the CPU: latency of dense, masked and compacted models, file sizes.

1. Group sparsity (``structure="group"``) at 20/50/80% for torchvision ResNet-18 (224x224, 1000
   classes) and the CIFAR ResNet-20/56 (32x32), with **one-shot masks on random weights**
   (``masks="one-shot"``: OMP's magnitude group masks, no training; the latency of a compacted
   model depends on the channels kept, which a group mask's sparsity fixes per group, not on the
   weights' values); and a ResNet-20 **trained briefly on real CIFAR-10** (``_compact_trained``:
   300 dense steps at batch 64 on 5,000 images) pruned at 50% two ways from the same weights:
   **BiP** (``masks="bip"``: ``BiP(model, 0.5, structure="group")``, 100 steps) and one-shot
   magnitude group masks. CPU latency at batch 1 and 16 of the dense model, the masked model (bip_fast
   layers, zeros multiplied) and the compacted one (:func:`bip_fast.compact`, which checks
   compacted == masked within 1e-4 of the output scale), next to the MACs ratio, the state-dict
   file size ratio (compacted / dense) and compact()'s counts (channels removed / left as zeros).
2. Unstructured checkpoint: global magnitude masks at 90% sparsity, the bitmask / CSR file of
   :func:`bip_fast.sparse.save_sparse` against ``torch.save`` of the dense-format state dict.
3. CSR linear layers (:class:`bip_fast.sparse.CSRLinear`) against dense nn.Linear at 50-99%
   sparsity, batch 1 and 16: where sparse execution is faster on this CPU, and where it is slower.

Timing protocol (``protocol`` in the JSON): the models compared in one table line are timed
**interleaved in one process**, the protocol of benchmarks/speedup.py's calibration
(``C.interleaved``): one session per model and batch size holds every kind (dense, a second copy
of the dense model, and the masked and compacted model of every mask); ``--rounds`` (12) rounds
plus one warm-up round that is discarded, each round one chunk of every kind in a shuffled order;
a chunk is the same number of calls for every kind of the session (enough for ``--chunk-seconds``
(0.2) of the dense model, 1 to 64); a kind's ms is the median over its chunks (p20/p80 kept).
``--threads`` (2) threads, ``torch.inference_mode``, eval mode. On a machine shared with other
jobs use ``--threads 1``: with 2 OpenMP threads on 2 busy vCPUs every parallel region waits for a
descheduled thread (ResNet-20 at batch 1 measured hundreds of ms instead of a few), and the
timings measure that wait; the JSON records the load average before and after
(``load_average``). **Control**: the two dense copies are timed as two kinds of every session and
must agree within 5% (``control.max_rel_diff`` = max |a − b| / min(a, b); ``control.passed``).
The CSR sessions (one per shape and batch: the dense layer and its CSR twin at every sparsity) use
the same protocol.

Writes ``benchmarks/results/compact-cpu.json``: ``rows`` (model, input, batch, sparsity, structure,
masks, weights, dense/masked/compacted ms with p20/p80, latency_ratio = compacted / dense,
masked_ratio, macs_ratio, file_ratio, compact's counts; "bip" rows: test accuracy and the
fraction of kept filters shared with the one-shot mask), ``control``, ``protocol``, ``sessions``,
``trained`` (recipe, accuracies), ``checkpoint`` and ``csr_linear``; ``commit`` (``env.dirty``
says whether the tree had changes). Run it on a quiet machine, or with ``--threads 1``:

    # full run: 6.5 minutes with --threads 1 on 2 busy vCPUs
    python benchmarks/compact.py --threads 1 --data-dir /work/shared/data/cifar10
    python benchmarks/compact.py --quick --json /tmp/c.json   # seconds: ResNet-20, tiny training and timing
"""

from __future__ import annotations

import argparse
import importlib.util
import copy
import io
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

try:  # run as a module (python -m benchmarks.compact) or as a script
    from . import _common as C
    from . import _compact_trained as T
    from ._onnx_latency import onnx_latency_rows
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    import _compact_trained as T  # type: ignore[no-redef]
    from _onnx_latency import onnx_latency_rows  # type: ignore[no-redef]

import bip_fast
from bip_fast.compaction import count_macs
from bip_fast.models import build
from bip_fast.sparse import CSRLinear, dense_state, save_sparse

MODELS = {  # name -> (builder, input size)
    "resnet18": (lambda: _torchvision("resnet18"), 224),
    "resnet20": (lambda: build("resnet20"), 32),
    "resnet56": (lambda: build("resnet56"), 32),
}
DEFAULT_JSON = os.path.join(C.RESULTS_DIR, "compact-cpu.json")
CONTROL_LIMIT = 0.05
CPU = torch.device("cpu")


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


# --------------------------------------------------------------------------------------------
# timing: one interleaved session per model and batch size
# --------------------------------------------------------------------------------------------
def timed_session(fns: Dict[str, Callable[[], Any]], base: str, rounds: int, chunk_seconds: float,
                  seed: int = 0, threads: Optional[int] = None) -> Tuple[Dict[str, C.Timing], int]:
    """{kind: Timing (ms per call)} of every kind of ``fns`` timed interleaved
    (:func:`C.interleaved`) under ``torch.inference_mode`` with ``threads`` CPU threads (default:
    as set), chunks of the same number of calls: enough for ``chunk_seconds`` of kind ``base``
    (from the median of 3 calls after 1 warm-up call), 1 to 64; and that number."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fns[base]()
            est = []
            for _ in range(3):
                t0 = time.perf_counter()
                fns[base]()
                est.append(time.perf_counter() - t0)
            calls = max(1, min(64, math.ceil(chunk_seconds / max(statistics.median(est), 1e-6))))
            timings = C.interleaved({k: C.chunk_timer(f, calls, CPU) for k, f in fns.items()}, rounds=rounds,
                                    seed=seed)
    finally:
        torch.set_num_threads(before)
    return timings, calls


def _rel_diff(a: float, b: float) -> float:
    return abs(a - b) / min(a, b)


def _variant(masked: nn.Module, example: torch.Tensor, dense_macs: int, dense_bytes: int, **fields) -> Dict[str, Any]:
    small, rep = bip_fast.compact(masked, example, return_report=True)
    small.eval()
    return dict(fields, masked=masked, small=small, macs_ratio=count_macs(small, example[:1]) / dense_macs,
                file_ratio=_bytes(small.state_dict()) / dense_bytes, params=sum(p.numel() for p in small.parameters()),
                channels=rep.channels, channels_removed=rep.channels_removed, channels_zero=rep.channels_zero,
                filters=rep.filters, filters_removed=rep.filters_removed, filters_zero=rep.filters_zero)


def _tag(v: Dict[str, Any]) -> str:
    return f"{v['masks']} {v['structure']} {v['sparsity']:.0%}"


def sessions_for(name: str, size: int, weights: str, dense: nn.Module, variants: List[Dict[str, Any]],
                 batches, opts) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Rows and session records of one model: per batch size one interleaved session of the dense
    model, its copy (the control), and the masked and compacted model of every variant."""
    rows, sessions = [], []
    twin = copy.deepcopy(dense).eval()
    dense_params = sum(p.numel() for p in dense.parameters())
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
        fns: Dict[str, Callable[[], Any]] = {"dense": lambda: dense(x), "dense (copy)": lambda: twin(x)}
        for v in variants:
            fns[f"masked {_tag(v)}"] = lambda m=v["masked"]: m(x)
            fns[f"compacted {_tag(v)}"] = lambda m=v["small"]: m(x)
        t0 = time.monotonic()
        tm, calls = timed_session(fns, "dense", opts.rounds, opts.chunk_seconds)
        d, d2 = tm["dense"].median_ms, tm["dense (copy)"].median_ms
        rec = {"model": name, "weights": weights, "batch": b, "kinds": list(fns), "calls_per_chunk": calls,
               "rounds": opts.rounds, "seconds": time.monotonic() - t0,
               "ms": {k: {"median": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms} for k, t in tm.items()},
               "control_rel_diff": _rel_diff(d, d2)}
        sessions.append(rec)
        C.log(f"[compact] {name} ({weights}) b{b}: {len(fns)} kinds x {opts.rounds} rounds of {calls} calls, "
              f"{rec['seconds']:.0f} s; dense {d:.2f} ms, copy {d2:.2f} ms ({rec['control_rel_diff']:.1%})")
        for v in variants:
            m, c = tm[f"masked {_tag(v)}"], tm[f"compacted {_tag(v)}"]
            row = {"model": name, "input": size, "batch": b, "sparsity": v["sparsity"], "structure": v["structure"],
                   "masks": v["masks"], "weights": weights,
                   "dense_ms": d, "dense_p20_ms": tm["dense"].p20_ms, "dense_p80_ms": tm["dense"].p80_ms,
                   "dense_copy_ms": d2, "masked_ms": m.median_ms, "masked_p20_ms": m.p20_ms,
                   "masked_p80_ms": m.p80_ms, "compacted_ms": c.median_ms, "compacted_p20_ms": c.p20_ms,
                   "compacted_p80_ms": c.p80_ms, "latency_ratio": c.median_ms / d, "masked_ratio": m.median_ms / d,
                   "dense_params": dense_params}
            row.update({k: v[k] for k in v if k not in ("masked", "small", "masks", "structure", "sparsity")})
            rows.append(row)
            C.log(f"[compact]   {_tag(v)}: masked {m.median_ms:.2f} ms, compacted {c.median_ms:.2f} "
                  f"({row['latency_ratio']:.2f}x), MACs {row['macs_ratio']:.2f}")
    return rows, sessions


def one_shot_rows(names, sparsities, batches, opts):
    rows, sessions = [], []
    for name in names:
        make, size = MODELS[name]
        torch.manual_seed(0)
        dense = make().eval()
        example = torch.randn(2, 3, size, size)
        dense_macs, dense_bytes = count_macs(dense, example[:1]), _bytes(dense.state_dict())
        variants = []
        for s in sparsities:
            model = copy.deepcopy(dense)
            bip_fast.attach_groups(model, example)
            masked = bip_fast.OMP(model, s, structure="group").model.eval()
            variants.append(_variant(masked, example, dense_macs, dense_bytes, masks="one-shot", structure="group",
                                     sparsity=s))
        r, se = sessions_for(name, size, "random init", dense, variants, batches, opts)
        rows += r
        sessions += se
    return rows, sessions


def onnx_rows(name: str, sparsity: float, batches, opts) -> List[Dict[str, Any]]:
    """ONNX Runtime (CPU) latency of the dense and the compacted ``name`` at ``sparsity`` (one-shot
    group masks, as in :func:`one_shot_rows`), timed interleaved (``_onnx_latency``)."""
    make, size = MODELS[name]
    torch.manual_seed(0)
    dense = make().eval()
    example = torch.randn(2, 3, size, size)
    model = copy.deepcopy(dense)
    bip_fast.attach_groups(model, example)
    small = bip_fast.compact(bip_fast.OMP(model, sparsity, structure="group").model.eval(), example).eval()
    rows = onnx_latency_rows(dense, small, example, batches=batches, rounds=opts.rounds,
                             chunk_seconds=opts.chunk_seconds, threads=opts.threads)
    return [dict(r, model=name, input=size, sparsity=sparsity, masks="one-shot", structure="group") for r in rows]


def trained_rows(recipe: T.Recipe, data_dir, batches, opts):
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dense, pruned, info = T.train(data_dir, recipe, example)
    dense_macs, dense_bytes = count_macs(dense, example[:1]), _bytes(dense.state_dict())
    variants = []
    for p in pruned:
        extra = {k: v for k, v in p.items() if k != "model"}
        variants.append(_variant(p["model"], example, dense_macs, dense_bytes, **extra))
    weights = f"CIFAR-10, {recipe.dense_steps} dense steps"
    rows, sessions = sessions_for(recipe.arch, 32, weights, dense, variants, batches, opts)
    for r in rows:
        r["dense_test_acc"] = info["dense_test_acc"]
    return rows, sessions, info


def checkpoint_row(name: str, sparsity: float = 0.9) -> Dict[str, Any]:
    torch.manual_seed(0)
    masked = bip_fast.OMP(MODELS[name][0](), sparsity).model
    buf = io.BytesIO()
    torch.save(dense_state(masked), buf)
    dense = buf.getbuffer().nbytes
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sparse.pt")
        save_sparse(masked, path)
        sparse = os.path.getsize(path)
    return {"model": name, "sparsity": sparsity, "structure": "global", "dense_bytes": dense,
            "sparse_bytes": sparse, "size_ratio": sparse / dense}


def csr_rows(shapes, sparsities, batches, opts) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """One interleaved session per shape and batch: every sparsity's dense layer and CSR twin."""
    rows, sessions = [], []
    for out_f, in_f in shapes:
        layers = {}
        for s in sparsities:
            torch.manual_seed(0)
            lin = nn.Linear(in_f, out_f).eval()
            with torch.no_grad():
                lin.weight.mul_(torch.rand_like(lin.weight) >= s)
            layers[s] = (lin, CSRLinear(lin))
        for b in batches:
            x = torch.randn(b, in_f)
            fns: Dict[str, Callable[[], Any]] = {}
            for s, (lin, sp) in layers.items():
                torch.testing.assert_close(sp(x), lin(x), rtol=1e-4, atol=1e-4)
                fns[f"dense {s:g}"] = lambda m=lin: m(x)
                fns[f"csr {s:g}"] = lambda m=sp: m(x)
            tm, calls = timed_session(fns, f"dense {sparsities[0]:g}", opts.rounds, opts.chunk_seconds / 2)
            sessions.append({"shape": [out_f, in_f], "batch": b, "kinds": list(fns), "calls_per_chunk": calls,
                             "rounds": opts.rounds})
            for s in sparsities:
                d, c = tm[f"dense {s:g}"].median_ms, tm[f"csr {s:g}"].median_ms
                rows.append({"shape": [out_f, in_f], "sparsity": s, "batch": b, "dense_ms": d, "csr_ms": c,
                             "ratio": c / d, "faster": c < d})
    return rows, sessions


def _table(rows, cols) -> str:
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in rows]
    return "\n".join([head] + body)


ROW_COLS = [("model", lambda r: r["model"]), ("weights", lambda r: r["weights"]), ("masks", lambda r: r["masks"]),
            ("input", lambda r: str(r["input"])), ("batch", lambda r: str(r["batch"])),
            ("sparsity", lambda r: f"{r['sparsity']:.0%}"), ("dense", lambda r: f"{r['dense_ms']:.2f}"),
            ("dense copy", lambda r: f"{r['dense_copy_ms']:.2f}"), ("masked", lambda r: f"{r['masked_ms']:.2f}"),
            ("compacted", lambda r: f"{r['compacted_ms']:.2f}"),
            ("latency ratio", lambda r: f"{r['latency_ratio']:.2f}"),
            ("masked ratio", lambda r: f"{r['masked_ratio']:.2f}"),
            ("MACs ratio", lambda r: f"{r['macs_ratio']:.2f}"), ("file ratio", lambda r: f"{r['file_ratio']:.2f}"),
            ("channels removed / zero", lambda r: f"{r['channels_removed']} / {r['channels_zero']}")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-20 only, sparsity 0.5, tiny training and timing "
                                                         "(smoke test)")
    ap.add_argument("--json", default=DEFAULT_JSON, help=f"output file (default {DEFAULT_JSON})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet18,resnet20,resnet56", help="models of the one-shot rows")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per session (12; --quick 2)")
    ap.add_argument("--chunk-seconds", type=float, default=None,
                    help="a chunk holds enough calls for this long a run of the dense model (0.2; --quick 0.005)")
    ap.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (else $BIP_FAST_DATA, "
                                                     "else ./data) for the trained ResNet-20 and its BiP rows")
    ap.add_argument("--no-bip", action="store_true", help="skip the trained model and its BiP rows")
    ap.add_argument("--dense-steps", type=int, default=None, help=f"dense training steps ({T.Recipe.dense_steps})")
    ap.add_argument("--bip-steps", type=int, default=None, help=f"BiP steps ({T.Recipe.bip_steps})")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    if args.quick:
        names, sparsities, batches = ["resnet20"], [0.5], [1, 2]
        csr_shapes, csr_sparsities, ckpt_model, recipe = [(64, 128)], [0.9], "resnet20", T.QUICK
    else:
        names, sparsities, batches = args.models.split(","), [0.2, 0.5, 0.8], [1, 16]
        csr_shapes, csr_sparsities, ckpt_model = [(1000, 512), (4096, 4096)], [0.5, 0.9, 0.95, 0.99], "resnet18"
        recipe = T.Recipe()
    load_start = os.getloadavg()
    recipe = replace(recipe, **{k: getattr(args, k) for k in ("dense_steps", "bip_steps") if getattr(args, k)})
    args.rounds = args.rounds or (2 if args.quick else 12)
    args.chunk_seconds = args.chunk_seconds or (0.005 if args.quick else 0.2)
    bip_skipped: Optional[str] = "--no-bip" if args.no_bip else None
    if bip_skipped is None and not T.data_available(args.data_dir):
        bip_skipped = f"CIFAR-10 not found (--data-dir {args.data_dir}, $BIP_FAST_DATA)"
        if not args.quick:
            print(f"{bip_skipped}: the BiP rows need it; pass --data-dir, or --no-bip to leave them out",
                  file=sys.stderr)
            return 2
    env = C.environment(CPU)
    print(C.format_header(env, "Compaction and sparse formats on the CPU"))
    print(f"- load average (1/5/15 min) at the start: {', '.join(f'{x:.2f}' for x in load_start)}")
    rows, sessions = one_shot_rows(names, sparsities, batches, args)
    trained: Dict[str, Any] = {"skipped": bip_skipped}
    if bip_skipped is None:
        r, s, info = trained_rows(recipe, args.data_dir, batches, args)
        rows, sessions, trained = rows + r, sessions + s, info
    onnx_skipped: Optional[str] = "--no-onnx" if args.no_onnx else None
    if onnx_skipped is None:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            onnx_skipped = f"{', '.join(missing)} not installed (pip install onnx onnxscript onnxruntime)"
    onnx = [] if onnx_skipped else [r for n in (["resnet20"] if args.quick else ["resnet18", "resnet20"])
                                    for r in onnx_rows(n, 0.5, batches, args)]
    ckpt = checkpoint_row(ckpt_model)
    csr, csr_sessions = csr_rows(csr_shapes, csr_sparsities, batches, args)
    worst = max(s["control_rel_diff"] for s in sessions)
    control = {"what": "two separate copies of the dense model timed as two kinds of every session",
               "max_rel_diff": worst, "limit": CONTROL_LIMIT, "passed": worst <= CONTROL_LIMIT,
               "rel_diff": "|a - b| / min(a, b) of the two medians",
               "per_session": [{"model": s["model"], "weights": s["weights"], "batch": s["batch"],
                                "rel_diff": s["control_rel_diff"]} for s in sessions]}
    protocol = {"name": "interleaved", "description": C.INTERLEAVED.format(rounds=args.rounds, seed=0),
                "session": "one per model (and weights) and batch size: dense, dense (copy), masked and compacted "
                           "of every mask; one per CSR shape and batch size: dense and CSR at every sparsity",
                "chunk": f"the same number of calls for every kind of a session: enough for {args.chunk_seconds} s "
                         f"of the dense model (CSR sessions: {args.chunk_seconds / 2} s), 1 to 64",
                "rounds": args.rounds, "chunk_seconds": args.chunk_seconds, "threads": args.threads,
                "mode": "torch.inference_mode, eval mode, time.perf_counter", "same_as": "benchmarks/_speedup_fair.py "
                "calibrate (rounds of chunks, one chunk of each kind per round in a shuffled order, first round "
                "discarded, median over chunks)"}
    print("\n## Group sparsity: latency (ms, median of interleaved chunks) and ratios to dense\n")
    print(_table(rows, ROW_COLS))
    print(f"\ncontrol: the two dense copies differ by at most {worst:.1%} "
          f"({'passed' if control['passed'] else 'FAILED'}, limit {CONTROL_LIMIT:.0%})")
    if bip_skipped:
        print(f"BiP rows skipped: {bip_skipped}")
    if onnx:
        print("\n## ONNX Runtime (CPU): dense ONNX against compacted ONNX, interleaved\n")
        print(_table(onnx, [("model", lambda r: r["model"]), ("input", lambda r: str(r["input"])),
                            ("sparsity", lambda r: f"{r['sparsity']:.0%}"), ("batch", lambda r: str(r["batch"])),
                            ("dense ms", lambda r: f"{r['dense_ms']:.2f}"), ("compact ms", lambda r: f"{r['compact_ms']:.2f}"),
                            ("ratio", lambda r: f"{r['latency_ratio']:.2f}")]))
    else:
        print(f"\nONNX Runtime rows skipped: {onnx_skipped}")
    print(f"\n## Unstructured checkpoint ({ckpt['model']}, {ckpt['sparsity']:.0%} global): "
          f"{ckpt['sparse_bytes'] / 2**20:.2f} MiB vs {ckpt['dense_bytes'] / 2**20:.2f} MiB dense, "
          f"ratio {ckpt['size_ratio']:.3f}\n")
    print("## CSR linear vs dense nn.Linear (ratio < 1: CSR faster)\n")
    print(_table(csr, [("shape", lambda r: "x".join(map(str, r["shape"]))),
                       ("sparsity", lambda r: f"{r['sparsity']:.0%}"),
                       ("batch", lambda r: str(r["batch"])), ("dense ms", lambda r: f"{r['dense_ms']:.3f}"),
                       ("CSR ms", lambda r: f"{r['csr_ms']:.3f}"), ("ratio", lambda r: f"{r['ratio']:.2f}")]))
    config = {"quick": args.quick, "threads": args.threads, "models": names, "sparsities": sparsities,
              "batches": batches, "rounds": args.rounds, "chunk_seconds": args.chunk_seconds,
              "masks": {"one-shot": "OMP's magnitude group masks (structure='group'), no training: on random "
                                    "weights (the models of --models) and on the trained ResNet-20",
                        "bip": "BiP(model, sparsity, structure='group', total_steps=bip_steps) on the trained "
                               "ResNet-20, package defaults otherwise"},
              "recipe": asdict(recipe), "data_dir": args.data_dir, "timer": protocol["description"]}
    wall = time.monotonic() - t_start
    C.write_json(args.json, benchmark="compact", env=env, config=config, rows=[],
                 extra={"rows": rows, "protocol": protocol, "control": control, "sessions": sessions,
                        "trained": trained, "checkpoint": ckpt, "csr_linear": csr, "csr_sessions": csr_sessions,
                        "onnxruntime": onnx, "onnxruntime_skipped": onnx_skipped,
                        "dirty": env.get("dirty"), "wall_seconds": wall,
                        "load_average": {"start": load_start, "end": os.getloadavg(),
                                         "note": "1/5/15-minute load averages of the machine (os.getloadavg)"},
                        "summary": {"rows": len(rows), "bip_rows": sum(r["masks"] == "bip" for r in rows),
                                    "control_passed": control["passed"],
                                    "csr_faster": sum(r["faster"] for r in csr), "csr_rows": len(csr)}})
    C.log(f"wrote {args.json} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
