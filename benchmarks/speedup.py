"""Headline benchmark: end-to-end training time and accuracy of BiP vs IMP (and OMP, Hydra).

All methods run on the same engine (bip_fast.pruning algorithms, the same kernels, the same
device-resident CIFAR-10 loaders, the same device) and start from the same dense pretrained model
(cached between runs in the cache dir, keyed by a hash of its config). Targets are points of the
paper's IMP sparsity series (SPEC §5): by default 48.8% (0.8^3), 73.8% (0.8^6) and 86.6% (0.8^9);
the cpu preset runs IMP rounds 3, 6, 9, 12, 15 and 18 (48.8% to 98.2%). Every method is global
(one ranking over all layers; Hydra too, whose own default is layer-wise).

Epoch budgets keep the paper's proportions, all scaled by one common factor (= dense epochs / 160):

- dense pretraining: D steps (paper: 160 epochs), lr 0.1, wd 5e-4, cosine;
- IMP: rounds of D steps each (the dense schedule), 20% of the remaining weights pruned per
  round, rewinding to step round(3/160 * D) of the dense run (paper: epoch 3 of 160);
- BiP (alternating and fused): straight to the target in round(100/160 * D) steps (gamma 1,
  wd 1e-4, cosine; bip_fast's defaults lr 0.1 and score lr 0.1 x 39,100 / steps, or the
  configuration tuning chose);
- OMP: one-shot magnitude pruning of the pretrained model, retraining for D steps;
- Hydra: score phase of round(20/160 * D) steps, then finetuning under the fixed mask for
  round(100/160 * D) steps — Hydra's 20 + 100 epoch CIFAR split;
- GMP, SNIP, GraSP, SynFlow: D steps (the at-init methods from the dense run's initialisation).

Fairness (``_speedup_fair.py``): presets with a validation split (``--preset cpu``) make every
decision on it and use the test set only to report; presets with ``tune`` give IMP, BiP, OMP, GMP
and Hydra the same tuning budget (4 configurations each, one rule); every method's steps are also
costed by per-step seconds measured interleaved in one process (the calibrated cost), with a
control row: dense, IMP-round and OMP steps are the same work and must cost the same. Every run
record names the code commit that made it, and --resume refuses runs of another commit.

Statistics (``_speedup_report.py``): every method's seed s starts from the dense model of seed s,
as IMP's does, so each row carries paired per-seed differences of test accuracy to IMP and to the
dense model (mean, 95% t-interval, seeds positive): non-inferior when the interval's lower end is
above -1 point, better when above 0. The sparsest winning ticket of a method is its highest target
non-inferior to dense. The crossing of IMP's validation accuracy is interpolated between
evaluation points, and the speedup there has a 90% bootstrap interval over seeds.

Timing counts training steps only (batch preparation on the device included, since every method
needs it), with the device synchronised before and after each timed chunk (CUDA events order the
work; perf_counter around the synchronised chunk). Evaluation, checkpoint writes and a per-method
warm-up (a few untimed steps on a throwaway copy) are excluded. Dense pretraining is NOT counted
for any method (all start from it); its time is printed separately. IMP's time at a target is the
sum of its rounds up to that sparsity.

Resumable: every finished run writes runs/<run>.json in the out dir, an unfinished one
ckpt/<run>.pt at each epoch boundary; ``--max-minutes`` stops cleanly at the next epoch boundary
after the budget, and ``--resume`` continues.

    python benchmarks/speedup.py                       # --preset quick
    python benchmarks/speedup.py --preset mid --max-minutes 9 --resume
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

try:  # imported as part of a package (python -m benchmarks.speedup)
    from . import _common as C
    from . import _speedup_fair as F
    from . import _speedup_report as R
    from . import _speedup_tables as T
    from ._speedup_loop import MixedCode, Stop, stop_on_signals
    from ._speedup_plots import plots
    from ._speedup_presets import (
        CONVERGENCE_FACTOR, GRIDS, IMP_RATE, METHODS, PAPER_DENSE_EPOCHS, PRESETS, SCORE_SAMPLES,
        TUNE_SEED, TUNE_SHARES)
    from ._speedup_runs import _device, dense_record, hparams, pretrain, run_imp, run_one_shot, setup, target_rounds
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    import _speedup_report as R  # type: ignore[no-redef]
    import _speedup_tables as T  # type: ignore[no-redef]
    from _speedup_loop import MixedCode, Stop, stop_on_signals  # type: ignore[no-redef]
    from _speedup_presets import (  # type: ignore[no-redef]
        CONVERGENCE_FACTOR, GRIDS, IMP_RATE, METHODS, PAPER_DENSE_EPOCHS, PRESETS, SCORE_SAMPLES,
        TUNE_SEED, TUNE_SHARES)
    import _speedup_fair as F  # type: ignore[no-redef]
    from _speedup_plots import plots  # type: ignore[no-redef]
    from _speedup_runs import (  # type: ignore[no-redef]
        _device, dense_record, hparams, pretrain, run_imp, run_one_shot, setup, target_rounds)


def validation_split(ctx) -> Dict[str, Any]:
    """The validation split checked against the training images by content (exact byte equality)."""
    d = ctx.data
    train = {bytes(x.cpu().numpy().tobytes()) for x in d.train_x}
    shared = sum(bytes(x.cpu().numpy().tobytes()) in train for x in d.val_x)
    per_class = torch.bincount(d.val_y.cpu(), minlength=d.num_classes).tolist()
    return {"disjoint_from_train": shared == 0, "images_identical_to_a_training_image": shared,
            "per_class": per_class, "drawn_from": "training images outside the training subset"}


def report_only(args) -> int:
    """The tables of a written speedup.json: tuning, every row, and the headline (IMP against the
    tuned methods), from the file alone."""
    path = args.json or os.path.join(args.out or os.path.join(C.RESULTS_DIR, f"speedup-cpu-{args.preset}"),
                                     "speedup.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print(f"--report-only: cannot read {path}: {e}", file=sys.stderr)
        return 2
    prov = doc.get("provenance") or {}
    print(f"{path}: commit {prov.get('commit', doc.get('commit'))}, complete {doc.get('complete')}")
    if doc.get("tuning"):
        print(T.tuning_table(doc["tuning"]))
        print()
    print(T.table(doc["rows"], doc["dense"]))
    print()
    core = [m for m in doc["config"]["methods"] if m in GRIDS or m in TUNE_SHARES]
    print(T.headline_table(doc["rows"], core))
    if doc.get("winning_tickets"):
        print()
        print(T.tickets_table(doc["winning_tickets"], doc["dense"]["acc"]))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (else $BIP_FAST_DATA, "
                                                    "else ./data, downloaded through torchvision when online)")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/speedup-<device>-<preset>)")
    p.add_argument("--cache-dir", default=None, help="dense pretraining cache (default benchmarks/results/cache)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (mean ± std when > 1)")
    p.add_argument("--resume", action="store_true", help="keep finished runs and continue unfinished ones")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly at the next epoch boundary "
                                                                    "after this budget (rerun with --resume)")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS)
                   + " (default: the preset's methods, else all)")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="with --resume: reuse runs, checkpoints and cached dense models made by another commit "
                        "(the results then name every commit involved)")
    # overrides of the preset (smoke tests, experiments)
    p.add_argument("--arch", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--dense-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--val", type=int, default=None, help="validation images held out of training (0: none)")
    p.add_argument("--target-rounds", default=None,
                   help="comma-separated IMP rounds whose sparsities are the targets (cpu preset: 3,6,9,12,15,18)")
    p.add_argument("--json", default=None, help="result JSON (default <out>/speedup.json)")
    p.add_argument("--report-only", action="store_true",
                   help="print the tables of an existing speedup.json (default: the preset's) without training")
    args = p.parse_args(argv)
    if args.report_only:
        return report_only(args)

    t_start = time.monotonic()
    device = _device(args.device)
    cfg = dict(PRESETS[args.preset])
    for k in ("arch", "train_subset", "test_subset", "dense_epochs", "batch_size", "seeds", "val"):
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    if args.target_rounds:
        try:
            cfg["target_rounds"] = tuple(sorted({int(r) for r in args.target_rounds.split(",") if r.strip()}))
        except ValueError:
            p.error(f"--target-rounds: expected comma-separated integers, got {args.target_rounds!r}")
        if not cfg["target_rounds"] or min(cfg["target_rounds"]) < 1:
            p.error(f"--target-rounds: expected rounds >= 1, got {args.target_rounds!r}")
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(cfg.get("methods", METHODS)))
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
    if "imp" not in methods:
        methods = ["imp"] + methods  # every ratio is against IMP
    args.out = args.out or os.path.join(C.RESULTS_DIR, f"speedup-{C.device_slug(device)}-{args.preset}")
    ctx, cfg, data_dir = setup(args, cfg, device)
    if ctx is None:
        return 2
    seeds = list(range(cfg["seeds"]))
    rounds = target_rounds(ctx)
    factor = cfg["dense_epochs"] / PAPER_DENSE_EPOCHS
    st = ctx.steps
    env = C.environment(device)
    print(C.format_header(env, f"BiP vs IMP end-to-end (preset {args.preset})"))
    print(f"- model {cfg['arch']}, CIFAR-10 {cfg['train_samples']} train / {cfg['test_samples']} test images, "
          f"batch {cfg['batch_size']} ({ctx.steps_per_epoch} steps/epoch), seeds {seeds}")
    print(f"- schedules scaled by {factor:.4g} x the paper's (dense {cfg['dense_epochs']} epochs = {ctx.D} steps): "
          f"IMP {st['imp_round']} steps/round with rewind to step {st['rewind']}; BiP {st['bip']} steps (100/160); "
          f"OMP {st['omp']} steps; Hydra {st['hydra_score']} score + {st['hydra_finetune']} finetune steps (20+100/160)")
    print("- time: training steps only (device synchronised, warm-up/eval/checkpoints excluded); dense "
          "pretraining is shared by all methods and not counted; IMP's time = sum of its rounds so far")
    print()

    results: Dict[str, List[Dict[str, Any]]] = {}
    dense_runs: List[Dict[str, Any]] = []
    long_runs: List[Dict[str, Any]] = []
    tuning: Dict[str, Any] = {}
    calib = None
    stopped = None
    # order: dense runs; tuning (seed TUNE_SEED); the tuned methods over all seeds; calibration;
    # the convergence check; the other methods (so an interrupted run has the main comparison)
    core = [m for m in methods if m in GRIDS or m in TUNE_SHARES]
    rest = [m for m in methods if m not in core]

    def run_methods(ms):
        for m in ms:
            for seed in seeds:
                if m == "imp":
                    results.setdefault("imp", []).append(run_imp(ctx, seed, pres[seed]))
                else:
                    for r in rounds:
                        results.setdefault(m, []).append(run_one_shot(ctx, m, r, seed, pres[seed]))

    with stop_on_signals(ctx):
        try:
            pres = {}
            for seed in seeds:
                pres[seed] = pre = pretrain(ctx, seed)
                dense_runs.append(dense_record(seed, pre, "curve", "final_sha256"))
            tuning = F.tune(ctx, methods, pres[TUNE_SEED], grids=bool(cfg.get("tune")))
            run_methods(core)
            calib = F.calibrate(ctx, methods, pres[seeds[0]])
            for seed in seeds:
                if cfg.get("check_convergence") and (seed == seeds[0] or cfg.get("check_convergence") == "all"):
                    lg = pretrain(ctx, seed, CONVERGENCE_FACTOR)
                    long_runs.append(dict(dense_record(seed, lg, "curve"), factor=CONVERGENCE_FACTOR))
            run_methods(rest)
        except Stop as s:
            stopped = str(s)
        except MixedCode as e:
            print(f"--resume: {e}", file=sys.stderr)
            return 2
    accs = [d["test_acc"] for d in dense_runs]
    vals = [d["val_acc"] for d in dense_runs if d.get("val_acc") is not None]
    dense = {"epochs": cfg["dense_epochs"], "acc": statistics.mean(accs) if accs else 0.0,
             "acc_std": statistics.stdev(accs) if len(accs) > 1 else None, "acc_per_seed": accs,
             "val_acc": statistics.mean(vals) if vals else None,
             "val_acc_std": statistics.stdev(vals) if len(vals) > 1 else None, "val_acc_per_seed": vals,
             "seconds": statistics.mean(d["train_seconds"] for d in dense_runs) if dense_runs else 0.0}
    if cfg.get("check_convergence"):
        conv = R.convergence(dense_runs, long_runs)
        dense.update(converged=conv["converged"], convergence=conv)
    rows = R.aggregate(results, methods, calib, rounds, dense_runs)
    checks = R.verdicts(rows, methods, rounds)
    tickets = R.winning_tickets(rows, results, dense["acc"], methods) if dense_runs else {}
    ctrl = R.control(calib, F.wall_per_step(dense_runs, results))
    dense_sha = {d["seed"]: d.get("final_sha256") for d in dense_runs}
    codes = [x.get("code") for x in dense_runs + long_runs] + [r.get("code") for rs in results.values() for r in rs]
    codes += [calib.get("code")] if calib else []
    provenance = {"commit": ctx.code["commit"], "dirty": ctx.code["dirty"],
                  "run_commits": sorted({(c or {}).get("commit", "unknown") for c in codes}),
                  "runs_dirty": any((c or {}).get("dirty") is not False for c in codes),
                  "note": "a tree dirty only under benchmarks/results/ counts as clean",
                  # every run started from the dense model its seed's row names (a cache retrained in
                  # a later session must reproduce it bit for bit)
                  "dense_mismatch": sorted(f"{r['method']} seed {r['seed']}" + (f" round {r['target_round']}"
                                                                                if "target_round" in r else "")
                                           for rs in results.values() for r in rs
                                           if r.get("dense_sha256") and r["dense_sha256"] != dense_sha.get(r["seed"]))}
    validation = {"images": cfg["val_samples"], **validation_split(ctx)} if cfg["val_samples"] else None
    print(T.tuning_table(tuning))
    print()
    print(T.table(rows, dense))
    print()
    if "converged" in dense:
        c = dense["convergence"]
        fmt = (lambda x: "n/a" if x is None else f"{x:+.2f}")
        print(f"- dense start converged: {c['converged']} (last quarter {fmt(c['last_quarter_gain_points'])} points, "
              f"x{CONVERGENCE_FACTOR:g} steps {fmt(c['longer_training_gain_points'])} points; {c['criterion']})")
    for v in checks:
        sp = "" if v["speedup_target"] is None else (
            f" (target >= {v['speedup_target']:g}x at the interval's lower end: "
            f"{'pass' if v['speedup_passed'] else 'FAIL'})")
        eq = "never reached" if v["speedup_at_imp_accuracy"] is None else f"{v['speedup_at_imp_accuracy']:.2f}x"
        ci = v.get("speedup_at_imp_accuracy_ci90")
        if ci:
            eq += " [90% CI " + ", ".join("never" if x is None else f"{x:.2f}x" for x in ci) + "]"
        pv = T.paired_str(v.get("paired_vs_imp")) or "n/a"
        print(f"- {100 * v['target_sparsity']:.1f}%: {R.label(v['method'])}: speedup at IMP's accuracy {eq}{sp}, "
              f"fixed budget {v['fixed_budget_speedup']:.2f}x; test accuracy vs IMP, paired per seed: {pv} "
              f"points: {v['accuracy_verdict']}")
    line = T.control_line(ctrl)
    if line:
        print(f"- {line}")
    print(f"- provenance: code {provenance['commit']} (dirty: {provenance['dirty']}), runs made at "
          f"{', '.join(provenance['run_commits'])}")
    if tickets:
        print()
        print(T.tickets_table(tickets, dense["acc"]))
    if stopped:
        print(f"\n{ctx.stop_reason()} during run {stopped}; partial results above. "
              f"Rerun with --resume to continue.")
    title = f"{cfg['arch']}, CIFAR-10 {cfg['train_samples']} imgs, {args.preset}, {C.device_name(device)}"
    pngs = plots(ctx.out, rows, results, dense, title, methods, rounds) if rows else []
    path = args.json or os.path.join(args.out, "speedup.json")
    config = dict(cfg, preset=args.preset, device=str(device), methods=methods, steps=st, schedule_factor=factor,
                  targets=[R.target_sparsity(r) for r in rounds], target_rounds=rounds, data_dir=str(data_dir),
                  cache_dir=args.cache_dir, hparams={
                      "dense": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "schedule": "cosine"},
                      **{m: dict(hparams(ctx, m), momentum=0.9, schedule="cosine") for m in methods},
                      "gmp": dict(hparams(ctx, "gmp"), prune_every=max(1, st["omp"] // 20)),
                      "at_init": {"score_samples": SCORE_SAMPLES,
                                  "init": "snip/grasp/synflow prune the dense run's initialisation"},
                      "imp_schedule": {"rate": IMP_RATE, "rewind_step": st["rewind"]}},
                  timing="calibrated cost: per-step seconds measured interleaved in one process x steps (the "
                         "headline); wall clock: training steps only, device synchronised; evaluation excluded; "
                         "dense pretraining not counted for any method")
    C.write_json(path, benchmark="speedup", env=env, config=config, rows=[], extra={
        "rows": rows, "verdicts": checks, "dense": dense, "winning_tickets": tickets,
        "winning_ticket": {m: t["sparsest_winning_ticket"] for m, t in tickets.items()}, "validation": validation,
        "tuning": tuning, "calibration": calib, "control": ctrl, "provenance": provenance,
        "complete": stopped is None, "stopped_in": stopped,
        "imp_rounds": [dict(rec, seed=res["seed"]) for res in results.get("imp", []) for rec in res["records"]],
        "plots": pngs, "wall_seconds": time.monotonic() - t_start,
        "continue_command": f"python benchmarks/speedup.py --preset {args.preset} --resume"
                            + ("" if args.max_minutes is None else f" --max-minutes {args.max_minutes:g}")
                            + ("" if not args.methods else f" --methods {args.methods}")
                            + ("" if args.out == os.path.join(C.RESULTS_DIR, f"speedup-{C.device_slug(device)}-"
                                                              f"{args.preset}") else f" --out {args.out}"),
        "summary": {"rows": len(rows), "complete": stopped is None}})
    print(f"\nwrote {path}" + "".join(f"\nwrote {q}" for q in pngs))
    print(f"wall-clock {time.monotonic() - t_start:.0f} s")
    return ctx.exit_status()


if __name__ == "__main__":
    sys.exit(main())
