"""The paper's structured comparison in the cpu regime: filter pruning at 20/50/80% filter sparsity.

Methods (``--methods``; ``_structured_runs.METHODS``):

- BiP with removable group masks (``structure="group"``: whole channels of each coupled channel
  group, :func:`bip_fast.attach_groups`) and BiP with the paper's per-layer filter masks
  (``structure="filter"``), the latter also with the two remedies benchmarks/filter_deficit.py
  found for its deficit at 80%: one shared score per filter whose gradient is taken as its
  BatchNorm would normalise it switched on (``bip_filter_unit_bn``: ``BiP(unit_scores=True,
  bn_correction=True)``; ``bip_filter_bn``, the correction alone, is optional);
- IMP-F: ``bip_fast.IMP(structure="filter")``, iterative filter pruning with rewinding; each round
  removes ~20% of each layer's remaining filters by the L2 norm of their weights, rewinds to step
  round(3/160·D) of the dense run and retrains D steps; the rounds' rates land on the targets
  (20%: 1 round of 20%, 50%: 2 more of 20.9%, 80%: 4 more of 20.5%; per-layer rounding of each
  round can move a layer's count by a filter, the measured filter sparsity is reported);
- OMP-F (one-shot, per-layer L2 filter norms, retraining D steps), Hydra (filter scores, 20/160·D
  score steps then 100/160·D finetuning steps) and L1-norm filter pruning (Li et al. 2017:
  ``OMP(structure="filter", filter_norm="l1")``, retraining D steps);
- optional, not in the default list: ``imp_group``, ``omp_group``, ``hydra_group``, ``l1_group``.

Per-layer filter masks prune every conv layer at the same ratio and leave the classifier dense
(SPEC §2, the authors' structured runs). Group masks leave the classifier's outputs whole (they
are the model's output) and cut its input columns with their channels. A group mask's target is
the fraction of each coupled group's channels (exact per group); the filters it removes over the
conv layers ("filters removed" in the table) can differ, because one group's channels are carried
by different numbers of layers (ResNet-8's channel-padding shortcuts merge its three stages into
one 64-channel group).

Regime: the "cpu" preset of benchmarks/speedup.py (ResNet-8, 4,000 CIFAR-10 training images, a
5,000-image class-balanced validation split held out of the other training images, no
augmentation, batch 128, 18 dense epochs = D = 558 steps, cosine schedules, the paper's schedule
proportions), 3 seeds, each from its own dense run (cached like speedup.py's, by config hash).
Hyper-parameters (``--tune``): ``grid`` (default) runs the grids of benchmarks/speedup.py (4
configurations per method: lr x weight decay for IMP-F/OMP-F/L1, lr x score lr for BiP and Hydra)
at 50% filter sparsity on seed 0 and keeps the highest final *validation* accuracy; ``speedup``
takes the choices benchmarks/speedup.py made for unstructured pruning from ``--tuned-from``
(default benchmarks/results/speedup-cpu-cpu/speedup.json; refused when that file holds none);
``none`` keeps the base settings. The JSON says which. The test set only reports.

Inference cost of every final model on the CPU, as a user would ship it: compacted
(:func:`bip_fast.compact`, which checks masked == compacted). Group masks lose every zeroed
channel; per-layer filter masks lose the zero filters their coupled groups let go (the ReLU after
the filter's BatchNorm maps its constant to 0, and no other layer of a residual addition still
produces the channel) and keep the rest as zeros (the table says which share went). Timing: right
after each run, the compacted, the masked and the plain dense model (and a second copy of it, a
control) interleaved in one process (benchmarks/compact.py's protocol: 10 rounds of one chunk per
kind in a shuffled order after a discarded warm-up round, median over chunks; ``--threads`` 2,
``inference_mode``, eval mode, batch 1 and 16; the dense model gets about ``--min-run-time``
seconds of timed calls), so ratios to dense do not drift with the machine. MACs and parameters
are those of the compacted model; "nonzero params" counts the weights the masks keep. (Results
made before this change timed per-layer filter masks as masked models; the table says which.)

Output (``--out``, default benchmarks/results/structured-cpu/): structured.json (config, tuning,
dense, rows = method x target with accuracy mean ± std over seeds and the inference cost, the run
records), structured.md (the table) and accuracy_vs_latency.png; runs/<run>.json per finished run
and ckpt/<run>.pt for an unfinished one. ``--max-minutes`` stops cleanly at the next epoch
boundary after the budget; ``--resume`` continues (refusing runs made by another commit unless
``--allow-mixed-commits``).

    python benchmarks/structured.py --max-minutes 60 --resume        # repeat until complete
    python benchmarks/structured.py --quick --out /tmp/s              # smoke: about a minute

Size of the full run (default methods, grid tuning), in SGD steps of ResNet-8 at batch 128 (a
BiP step counts twice: two forward/backward passes): per seed BiP 2 x 3 x 698, IMP-F 7 x 558,
OMP-F and L1 3 x 558 each, Hydra 3 x 419: about 12,700; 3 seeds about 38,100; tuning about 13,800
more (3 extra configurations per method, IMP-F's through 3 rounds); dense runs 3 x 558 unless
cached. About 53,600 steps; measured: 80 minutes in all on an Intel Xeon with 2 vCPUs (~0.075 s
per ResNet-8 step), evaluation and latency included; the four group-mask baselines add about an
hour.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

try:  # imported as part of a package (python -m benchmarks.structured)
    from . import _common as C
    from . import _structured_report as R
    from ._speedup_loop import MixedCode, Stop, stop_on_signals
    from ._speedup_presets import PRESETS
    from ._speedup_runs import _device, dense_record, pretrain, setup
    from ._structured_runs import DEFAULT_METHODS, METHODS, SPARSITIES, dense_cost, imp_schedule, run_method, tune
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    import _structured_report as R  # type: ignore[no-redef]
    from _speedup_loop import MixedCode, Stop, stop_on_signals  # type: ignore[no-redef]
    from _speedup_presets import PRESETS  # type: ignore[no-redef]
    from _speedup_runs import _device, dense_record, pretrain, setup  # type: ignore[no-redef]
    from _structured_runs import (  # type: ignore[no-redef]
        DEFAULT_METHODS, METHODS, SPARSITIES, dense_cost, imp_schedule, run_method, tune)

SPEEDUP_JSON = os.path.join(C.RESULTS_DIR, "speedup-cpu-cpu", "speedup.json")
# --quick: a 256-image subset, one seed, one dense epoch (4 steps of 64), tiny timings
QUICK = {"train_subset": 256, "test_subset": 200, "val": 100, "dense_epochs": 1, "batch_size": 64, "seeds": 1,
         "eval_points": None, "min_run_time": 0.01}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny subset, 1 seed, 1 dense epoch")
    p.add_argument("--device", default="cpu", help="training device (latency is always measured on the CPU)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (else $BIP_FAST_DATA)")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/structured-cpu[-quick])")
    p.add_argument("--cache-dir", default=None, help="dense pretraining cache (default benchmarks/results/cache)")
    p.add_argument("--json", default=None, help="result JSON (default <out>/structured.json)")
    p.add_argument("--resume", action="store_true", help="keep finished runs and continue unfinished ones")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly at the next epoch boundary "
                                                                    "after this budget (rerun with --resume)")
    p.add_argument("--allow-mixed-commits", action="store_true", help="with --resume: reuse runs made by another commit")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES), help="filter sparsities")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; --quick 1)")
    p.add_argument("--tune", choices=("grid", "speedup", "none"), default="grid", help="where hyper-parameters come from")
    p.add_argument("--tuned-from", default=SPEEDUP_JSON, help="with --tune speedup: benchmarks/speedup.py's JSON")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the latency measurement")
    p.add_argument("--batches", default="1,16", help="batch sizes of the latency measurement")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per latency measurement (0.5)")
    p.add_argument("--dense-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    args = p.parse_args(argv)

    t_start = time.monotonic()
    device = _device(args.device)
    cfg = dict(PRESETS["cpu"], check_convergence=False, tune=args.tune, seeds=3)
    if args.quick:
        cfg.update({k: v for k, v in QUICK.items() if k != "min_run_time"})
    for k in ("seeds", "dense_epochs", "train_subset"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
    sparsities = sorted(float(s) for s in args.sparsities.split(","))
    if not sparsities or not all(0.0 < s < 1.0 for s in sparsities):
        p.error(f"--sparsities: expected values in (0, 1), got {args.sparsities}")
    latency = {"batches": [int(b) for b in args.batches.split(",")], "threads": args.threads,
               "min_run_time": args.min_run_time or (QUICK["min_run_time"] if args.quick else 0.5)}
    cfg.update(sparsities=sparsities, latency=latency)
    args.out = args.out or os.path.join(C.RESULTS_DIR, "structured-cpu" + ("-quick" if args.quick else ""))
    ctx, cfg, data_dir = setup(args, cfg, device)
    if ctx is None:
        return 2
    ctx.sparsities, ctx.latency = sparsities, latency
    seeds = list(range(cfg["seeds"]))
    env = C.environment(device)
    print(C.format_header(env, "Structured pruning: accuracy and CPU latency (cpu regime)"))
    print(f"- model {cfg['arch']}, CIFAR-10 {cfg['train_samples']} train / {cfg['val_samples']} validation / "
          f"{cfg['test_samples']} test images, batch {cfg['batch_size']}, dense {ctx.D} steps, seeds {seeds}")
    print(f"- filter sparsities {sparsities}; IMP-F rounds (rate, target): "
          f"{[(round(r, 4), t) for r, t in imp_schedule(sparsities)]}; hyper-parameters: --tune {args.tune}")
    print()

    records: Dict[str, List[Dict[str, Any]]] = {}
    dense_runs: List[Dict[str, Any]] = []
    tuning: Dict[str, Any] = {}
    stopped = None
    with stop_on_signals(ctx):
        try:
            pres = {}
            for seed in seeds:
                pres[seed] = pre = pretrain(ctx, seed)
                dense_runs.append(dense_record(seed, pre))
            tuning = tune(ctx, methods, pres[seeds[0]], args.tune, args.tuned_from)
            for seed in seeds:  # seed by seed: an interrupted run compares every method on the seeds it has
                for m in methods:
                    records.setdefault(m, []).extend(run_method(ctx, m, seed, pres[seed]))
        except Stop as s:
            stopped = str(s)
        except MixedCode as e:
            print(f"--resume: {e}", file=sys.stderr)
            return 2
        except ValueError as e:  # --tune speedup without a tuned file
            print(str(e), file=sys.stderr)
            return 2

    accs = [d["test_acc"] for d in dense_runs]
    vals = [d["val_acc"] for d in dense_runs if d.get("val_acc") is not None]
    dense = {"acc": statistics.mean(accs) if accs else 0.0, "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
             "acc_per_seed": accs, "val_acc": statistics.mean(vals) if vals else None, "runs": dense_runs,
             "cost": dense_cost(ctx)}
    rows = R.aggregate(records, methods, dense_runs)
    flips = R.mask_flips(records, methods)
    md = R.table(rows, dense, latency["batches"])
    print(md)
    codes = [d.get("code") for d in dense_runs] + [r.get("code") for rs in records.values() for r in rs]
    provenance = {"commit": ctx.code["commit"], "dirty": ctx.code["dirty"],
                  "run_commits": sorted({(c or {}).get("commit", "unknown") for c in codes})}
    if stopped:
        print(f"\n{ctx.stop_reason()} during run {stopped}; partial results above. "
              f"Rerun with --resume to continue.")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "structured.md"), "w") as f:
        f.write(md + "\n")
    title = (f"{cfg['arch']}, CIFAR-10 {cfg['train_samples']} imgs, {len(seeds)} seed(s), "
             f"{latency['threads']} CPU threads, {C.device_name(torch.device('cpu'))}")
    pngs = [R.plot(os.path.join(args.out, "accuracy_vs_latency.png"), rows, dense, latency["batches"], title)] if rows else []
    path = args.json or os.path.join(args.out, "structured.json")
    config = dict(cfg, device=str(device), methods=methods, steps=ctx.steps, data_dir=str(data_dir),
                  imp_rounds=[{"rate": r, "target": t} for r, t in imp_schedule(sparsities)],
                  structures={m: METHODS[m][1] for m in methods}, classifier="dense under per-layer filter masks",
                  timer="compacted, masked and dense models interleaved in one process (benchmarks/compact.py's "
                        "protocol), median over chunks, inference_mode, eval mode, CPU")
    again = ["python benchmarks/structured.py --resume"] + (["--quick"] if args.quick else []) + (
        [] if args.max_minutes is None else [f"--max-minutes {args.max_minutes:g}"]) + (
        [] if tuple(methods) == DEFAULT_METHODS else [f"--methods {','.join(methods)}"]) + (
        [] if args.out == os.path.join(C.RESULTS_DIR, "structured-cpu" + ("-quick" if args.quick else ""))
        else [f"--out {args.out}"])
    extra = {"rows": rows, "dense": dense, "tuning": tuning, "records": records, "provenance": provenance,
             "mask_flips": flips,
             "complete": stopped is None, "stopped_in": stopped, "continue_command": " ".join(again), "plots": pngs,
             "summary": {"rows": len(rows), "complete": stopped is None}}
    C.write_json(path, benchmark="structured", env=env, config=config, rows=[],
                 extra=dict(extra, wall_seconds=time.monotonic() - t_start))
    for q in [path] + pngs:
        print(f"wrote {q}")
    print(f"wall-clock {time.monotonic() - t_start:.0f} s")
    return ctx.exit_status()


if __name__ == "__main__":
    sys.exit(main())
