"""What pruning buys at inference on the CPU: latency of dense, masked and compacted models, file sizes.

1. Group sparsity (``structure="group"``, one-shot magnitude masks: OMP without retraining; the
   latency does not depend on the weights' values) at 20/50/80% for torchvision ResNet-18
   (224x224, 1000 classes) and the CIFAR ResNet-20/56 (32x32): CPU latency at batch 1 and 16 of
   the dense model, the masked model (bip_fast layers, zeros multiplied) and the compacted one
   (:func:`bip_fast.compact`), next to the MACs ratio and the state-dict file size ratio
   (compacted / dense). Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` (median) with
   ``--threads`` threads (2) under ``torch.inference_mode``, eval mode; each model is checked
   first (compacted == masked within 1e-4 of the output scale, by ``compact`` itself).
2. Unstructured checkpoint: global magnitude masks at 90% sparsity, the bitmask / CSR file of
   :func:`bip_fast.sparse.save_sparse` against ``torch.save`` of the dense-format state dict.
3. CSR linear layers (:class:`bip_fast.sparse.CSRLinear`) against dense nn.Linear at 50-99%
   sparsity, batch 1 and 16: where sparse execution is faster on this CPU, and where it is slower.

Writes ``benchmarks/results/compact-cpu.json``: ``rows`` (model, input, batch, sparsity,
dense/masked/compacted ms, latency_ratio = compacted / dense, masked_ratio, macs_ratio,
file_ratio), ``checkpoint`` (model, sparsity 0.9, bytes, size_ratio) and ``csr_linear``. Run it on
a quiet machine (other processes change CPU timings):

    python benchmarks/compact.py                       # full run (a few minutes; not yet timed on a quiet machine)
    python benchmarks/compact.py --quick --json /tmp/c.json   # seconds: ResNet-20, tiny timing
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
from typing import Any, Dict, List

import torch
from torch import nn
from torch.utils import benchmark as tb

try:  # run as a module (python -m benchmarks.compact) or as a script
    from . import _common as C
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]

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


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def _ms(fn, threads: int, min_run_time: float) -> float:
    """Median milliseconds of ``fn()`` (warm-up calls excluded)."""
    with torch.inference_mode():
        for _ in range(2):
            fn()
        t = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def group_rows(names, sparsities, batches, threads: int, min_run_time: float) -> List[Dict[str, Any]]:
    rows = []
    for name in names:
        make, size = MODELS[name]
        torch.manual_seed(0)
        dense = make().eval()
        example = torch.randn(2, 3, size, size)
        dense_macs = count_macs(dense, example[:1])
        dense_bytes = _bytes(dense.state_dict())
        dense_ms = {b: _ms(lambda m=dense, x=torch.randn(b, 3, size, size): m(x), threads, min_run_time)
                    for b in batches}
        for s in sparsities:
            model = copy.deepcopy(dense)
            bip_fast.attach_groups(model, example)
            masked = bip_fast.OMP(model, s, structure="group").model.eval()
            small = bip_fast.compact(masked, example).eval()
            macs_ratio = count_macs(small, example[:1]) / dense_macs
            file_ratio = _bytes(small.state_dict()) / dense_bytes
            for b in batches:
                x = torch.randn(b, 3, size, size)
                m_ms = _ms(lambda: masked(x), threads, min_run_time)
                c_ms = _ms(lambda: small(x), threads, min_run_time)
                rows.append({"model": name, "input": size, "batch": b, "sparsity": s, "dense_ms": dense_ms[b],
                             "masked_ms": m_ms, "compacted_ms": c_ms, "latency_ratio": c_ms / dense_ms[b],
                             "masked_ratio": m_ms / dense_ms[b], "macs_ratio": macs_ratio,
                             "file_ratio": file_ratio,
                             "params": sum(p.numel() for p in small.parameters()),
                             "dense_params": sum(p.numel() for p in dense.parameters())})
                C.log(f"{name} {size} b{b} s{s}: dense {dense_ms[b]:.2f} ms, masked {m_ms:.2f}, compacted "
                      f"{c_ms:.2f} ({c_ms / dense_ms[b]:.2f}x), MACs {macs_ratio:.2f}")
    return rows


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


def csr_rows(shapes, sparsities, batches, threads: int, min_run_time: float) -> List[Dict[str, Any]]:
    rows = []
    for out_f, in_f in shapes:
        for s in sparsities:
            torch.manual_seed(0)
            lin = nn.Linear(in_f, out_f).eval()
            with torch.no_grad():
                lin.weight.mul_(torch.rand_like(lin.weight) >= s)
            sp = CSRLinear(lin)
            for b in batches:
                x = torch.randn(b, in_f)
                torch.testing.assert_close(sp(x), lin(x), rtol=1e-4, atol=1e-4)
                d_ms = _ms(lambda: lin(x), threads, min_run_time)
                s_ms = _ms(lambda: sp(x), threads, min_run_time)
                rows.append({"shape": [out_f, in_f], "sparsity": s, "batch": b, "dense_ms": d_ms, "csr_ms": s_ms,
                             "ratio": s_ms / d_ms, "faster": s_ms < d_ms})
    return rows


def _table(rows, cols) -> str:
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in rows]
    return "\n".join([head] + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-20 only, sparsity 0.5, short timing (smoke test)")
    ap.add_argument("--json", default=DEFAULT_JSON, help=f"output file (default {DEFAULT_JSON})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet18,resnet20,resnet56")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        names, sparsities, batches, mrt = ["resnet20"], [0.5], [1, 2], 0.01
        csr_shapes, csr_sparsities, ckpt_model = [(64, 128)], [0.9], "resnet20"
    else:
        names, sparsities, batches, mrt = args.models.split(","), [0.2, 0.5, 0.8], [1, 16], args.min_run_time
        csr_shapes, csr_sparsities, ckpt_model = [(1000, 512), (4096, 4096)], [0.5, 0.9, 0.95, 0.99], "resnet18"
    env = C.environment(torch.device("cpu"))
    print(C.format_header(env, "Compaction and sparse formats on the CPU"))
    rows = group_rows(names, sparsities, batches, args.threads, mrt)
    ckpt = checkpoint_row(ckpt_model)
    csr = csr_rows(csr_shapes, csr_sparsities, batches, args.threads, mrt)
    print("\n## Group sparsity: latency (ms, median) and ratios to dense\n")
    print(_table(rows, [("model", lambda r: r["model"]), ("input", lambda r: str(r["input"])),
                        ("batch", lambda r: str(r["batch"])), ("sparsity", lambda r: f"{r['sparsity']:.0%}"),
                        ("dense", lambda r: f"{r['dense_ms']:.2f}"), ("masked", lambda r: f"{r['masked_ms']:.2f}"),
                        ("compacted", lambda r: f"{r['compacted_ms']:.2f}"),
                        ("latency ratio", lambda r: f"{r['latency_ratio']:.2f}"),
                        ("MACs ratio", lambda r: f"{r['macs_ratio']:.2f}"),
                        ("file ratio", lambda r: f"{r['file_ratio']:.2f}")]))
    print(f"\n## Unstructured checkpoint ({ckpt['model']}, {ckpt['sparsity']:.0%} global): "
          f"{ckpt['sparse_bytes'] / 2**20:.2f} MiB vs {ckpt['dense_bytes'] / 2**20:.2f} MiB dense, "
          f"ratio {ckpt['size_ratio']:.3f}\n")
    print("## CSR linear vs dense nn.Linear (ratio < 1: CSR faster)\n")
    print(_table(csr, [("shape", lambda r: "x".join(map(str, r["shape"]))), ("sparsity", lambda r: f"{r['sparsity']:.0%}"),
                       ("batch", lambda r: str(r["batch"])), ("dense ms", lambda r: f"{r['dense_ms']:.3f}"),
                       ("CSR ms", lambda r: f"{r['csr_ms']:.3f}"), ("ratio", lambda r: f"{r['ratio']:.2f}")]))
    config = {"quick": args.quick, "threads": args.threads, "models": names, "sparsities": sparsities,
              "batches": batches, "min_run_time": mrt, "masks": "OMP (one-shot magnitude), structure group",
              "timer": "torch.utils.benchmark blocked_autorange median, inference_mode, eval"}
    C.write_json(args.json, benchmark="compact", env=env, config=config, rows=[],
                 extra={"rows": rows, "checkpoint": ckpt, "csr_linear": csr,
                        "summary": {"rows": len(rows), "csr_faster": sum(r["faster"] for r in csr),
                                    "csr_rows": len(csr)}})
    C.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
