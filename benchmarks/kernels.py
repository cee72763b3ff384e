"""Kernel benchmarks of bip_fast's ops against the PyTorch baselines they replace.

Sections (each backend is checked against the reference on the same inputs before it is timed;
a mismatch aborts the run, a backend that raises is reported as an error row and skipped):

1. ``topk``    global top-K masks over the 21 weight tensors of a CIFAR ResNet-18 (11.17M
               scores) at density 0.1 and 0.5, vs ``torch.sort`` / ``torch.kthvalue`` /
               ``torch.topk`` of the concatenated |s| (the baselines include the ``cat`` and
               ``abs`` but not building masks from the threshold, which only favours them);
               also relative to one read of the scores at the measured bandwidth, and the
               variant with the first-digit histogram supplied (as after ``fused_sgd_``).
2. ``sgd``     ``fused_sgd_`` over the same 21 tensors vs the unfused ``torch._foreach_*``
               sequence and ``torch.optim.SGD(foreach=True).step()``; bytes that must move:
               read p, g, b and write p, b = 20 bytes per element (fp32).
3. ``modules`` MaskedLinear / MaskedConv2d forward + backward (scores need grad, ig_scale 1.0)
               vs nn.Linear / nn.Conv2d of the same shape.

Targets (printed next to each figure): GPU topk >= 20x torch.sort and <= 3 reads of the
scores; CPU topk >= 3x torch.sort and torch.kthvalue; GPU fused_sgd_ >= 70% of the measured copy
bandwidth, CPU faster than the _foreach sequence; masked modules <= 1.10x dense.

Usage:
    python benchmarks/kernels.py                    # full run, JSON to benchmarks/results/
    python benchmarks/kernels.py --quick --json /tmp/k.json --device cpu
    python benchmarks/kernels.py --backends cuda,triton --sections topk,sgd
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

try:  # imported as part of a package (python -m benchmarks.kernels)
    from . import _common as C
    from ._kernel_inputs import _module_configs, resnet18_weights, shrink
    from ._kernel_runner import CorrectnessError, Runner, select_backends
    from ._kernel_sections import bench_modules, bench_sgd, bench_topk
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _kernel_inputs import _module_configs, resnet18_weights, shrink  # type: ignore[no-redef]
    from _kernel_runner import CorrectnessError, Runner, select_backends  # type: ignore[no-redef]
    from _kernel_sections import bench_modules, bench_sgd, bench_topk  # type: ignore[no-redef]

SECTIONS = ("topk", "sgd", "modules")
# CorrectnessError: raised by the sections, caught by callers as kernels.CorrectnessError
__all__ = ["CorrectnessError", "SECTIONS", "main", "parse_args"]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    p.add_argument("--json", default=None, help="result file (default benchmarks/results/kernels-<device>.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None,
                   help="comma list of reference,cpu,cuda,triton (default: every available backend; "
                        "on CPU the Triton interpreter only when named)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--densities", default="0.1,0.5", help="top-K densities (kept fraction)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (max)")
    p.add_argument("--slow-repeats", type=int, default=None, help="timed calls for slow baselines (max)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per measurement")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    defaults = {  # (quick, cpu, gpu)
        "repeats": (3, 15, 100),
        "slow_repeats": (2, 3, 20),
        "warmup": (1, 2, 3),
        "max_seconds": (0.5, 2.0, 2.0),
    }
    for k, (q, c, g) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else (g if gpu else c))
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    for s in a.sections:
        if s not in SECTIONS:
            p.error(f"--sections: unknown section {s!r}; expected some of {SECTIONS}")
    try:
        a.densities = [float(x) for x in a.densities.split(",") if x.strip()]
    except ValueError:
        p.error(f"--densities: expected comma-separated floats, got {a.densities!r}")
    if not a.densities or not all(0.0 < d < 1.0 for d in a.densities):
        p.error(f"--densities: expected values in (0, 1), got {a.densities}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    env = C.environment(device)
    print(C.format_header(env, "bip_fast kernel benchmarks" + (" (--quick)" if args.quick else "")))
    print(flush=True)

    backends, skipped = select_backends(args.backends, device)
    for b, why in skipped.items():
        C.log(f"kernels: backend {b!r} not benchmarked: {why}")

    weights, shapes_from = resnet18_weights(args.seed)
    if args.quick:
        weights = shrink(weights)
    scores = [w.to(device) for w in weights]
    runner = Runner(args, device)

    C.log("kernels: measuring bandwidth")
    bw = C.measure_bandwidth(device, 2**24 if args.quick else None, repeats=5 if args.quick else 20)
    runner.add(C.Row("bandwidth: copy_", "torch", f"{bw['bytes'] / 2**20:.0f} MiB", C.Timing(**bw["copy_ms"]),
                     metric=f"{bw['copy_gbs']:.1f} GB/s (read+write)"))
    runner.add(C.Row("bandwidth: sum()", "torch", f"{bw['bytes'] / 2**20:.0f} MiB", C.Timing(**bw["sum_ms"]),
                     metric=f"{bw['read_gbs']:.1f} GB/s (read)"))

    if "topk" in args.sections:
        C.log("kernels: topk_masks")
        bench_topk(runner, scores, backends, args.densities, bw)
    if "sgd" in args.sections:
        C.log("kernels: fused_sgd_")
        bench_sgd(runner, weights, backends, bw)
    if "modules" in args.sections:
        C.log("kernels: masked modules")
        bench_modules(runner, backends, args.quick)

    elapsed = time.perf_counter() - t_start
    print(C.markdown_table(runner.rows))
    print()
    judged = [r for r in runner.rows if r.passed is not None]
    print(f"targets: {sum(1 for r in judged if r.passed)}/{len(judged)} pass; "
          f"backends {', '.join(backends) or 'none'}; {elapsed:.0f} s")
    for b, why in skipped.items():
        print(f"not benchmarked: {b}: {why}")
    for e in runner.errors:
        print(f"error: {e['op']} [{e['backend']}] {e['config']}: {e['error']}")

    path = args.json or os.path.join(C.RESULTS_DIR, f"kernels-{C.device_slug(device)}.json")
    config = {
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "quick": args.quick,
        "device": args.device,
        "backends": backends,
        "skipped_backends": skipped,
        "sections": args.sections,
        "densities": args.densities,
        "repeats": args.repeats,
        "slow_repeats": args.slow_repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "seed": args.seed,
        "shapes_from": shapes_from,
        "shapes": [list(w.shape) for w in weights],
        "numel": sum(w.numel() for w in weights),
        "sgd": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "bytes_per_element": 20},
        "modules": [{"kind": k, "label": l, "channels": list(c), "input": list(s)}
                    for k, l, c, s in _module_configs(device.type == "cuda", args.quick)],
        "baselines_note": "sort/kthvalue/topk baselines time cat + abs + the call, not mask construction",
    }
    C.write_json(path, benchmark="kernels", env=env, config=config, rows=runner.rows,
                 extra={"bandwidth": bw, "errors": runner.errors, "elapsed_s": elapsed})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
