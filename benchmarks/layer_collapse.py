"""Why BiP with global masks collapses at the highest targets of the cpu speedup preset: how its
first steps move the mask between layers, and what the score gradient of an empty filter is.

In ``benchmarks/speedup.py --preset cpu`` BiP (alternating, the configuration chosen on the
validation split at 48.8%) ends at chance accuracy at 98.2% and far below IMP at 96.5%, with a
final mask that shares almost nothing with its first one. For each seed's dense model (the preset's,
cached like speedup.py's) and each target round (``--rounds``, default 12, 15, 18: 93.1%, 96.5%,
98.2%), this script builds BiP's first global mask (magnitude) and, per configuration:

1. **The score gradient at the first mask** (one forward/backward on a training batch, train mode):
   per layer, the kept weights, the output filters that keep no weight ("empty"), and the mean
   |score gradient| of the pruned entries of empty filters against the pruned entries of filters
   that keep some weight. An empty filter outputs an all-zero channel; the BatchNorm after it divides
   that channel's deviation by sqrt(eps) instead of a standard deviation, so its entries' score
   gradients are larger by about sigma / sqrt(eps) (docs/results.md, the filter-deficit study).
2. **The first steps** (``--steps``, default 44: the preset's first evaluation point): per layer,
   the weights the mask keeps after steps 1, 2, 5, 10, 20 and 44, the layers it empties, and the
   validation accuracy (the test set is not used).

Configurations: ``chosen`` (speedup.py's choice, read from ``--tuned-from``), ``score_lr_0.1`` (the
chosen weight lr with the paper's score lr instead of the scaled rule) and ``chosen_bn`` (chosen with
``BiP(bn_correction=True)``); ``--configs`` picks some. Output (``--out``): layer_collapse.json and
layer_collapse.md. ``--steps 349`` follows BiP's whole schedule of the preset (the validation
accuracy at its end then says whether a configuration that keeps every layer also recovers).

    python benchmarks/layer_collapse.py --data-dir ../shared/data/cifar10
    python benchmarks/layer_collapse.py --data-dir ../shared/data/cifar10 --steps 349 --rounds 15,18 \
        --configs score_lr_0.1,chosen_bn --out benchmarks/results/layer-collapse-cpu-full
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

from bip_fast.masks import kept_units

try:  # imported as part of a package
    from . import _common as C
    from ._speedup_loop import _batches, _loader, evaluate
    from ._speedup_report import target_sparsity
    from ._speedup_runs import (_device, _model_from, dense_record, hparams, make_algorithm, pretrain, run_arguments,
                                setup, study_config)
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_loop import _batches, _loader, evaluate  # type: ignore[no-redef]
    from _speedup_report import target_sparsity  # type: ignore[no-redef]
    from _speedup_runs import (  # type: ignore[no-redef]
        _device, _model_from, dense_record, hparams, make_algorithm, pretrain, run_arguments, setup, study_config)

METHOD = "bip_alternating"
MARKS = (1, 2, 5, 10, 20, 44)


def configs(chosen: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {"chosen": dict(chosen), "score_lr_0.1": dict(chosen, score_lr=0.1),
            "chosen_bn": dict(chosen, bn_correction=True)}


def first_gradient(ctx, alg, seed: int) -> List[Dict[str, Any]]:
    """Measurement 1 at the algorithm's first mask, per layer."""
    model = alg.model.train()
    x, y = next(iter(ctx.data.train_loader(ctx.cfg["batch_size"], seed=1000 * seed + 7, augment=False)))
    torch.nn.functional.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device)).backward()
    out = []
    for name, mod in zip(alg.module_names, alg.modules):
        g = mod.scores.grad.detach().abs()
        live = kept_units(mod.mask)
        pruned = mod.mask == 0
        in_empty = pruned & ~live.view(-1, *([1] * (g.dim() - 1)))
        in_live = pruned & live.view(-1, *([1] * (g.dim() - 1)))
        mean = (lambda sel: float(g[sel].mean()) if bool(sel.any()) else None)
        out.append({"layer": name, "numel": mod.mask.numel(), "kept": int(mod.mask.sum()),
                    "filters": live.numel(), "empty_filters": int((~live).sum()),
                    "grad_pruned_in_empty": mean(in_empty), "grad_pruned_in_live": mean(in_live)})
    alg._zero_grad()
    return out


def first_steps(ctx, alg, seed: int, steps: int) -> List[Dict[str, Any]]:
    """Measurement 2: the mask's per-layer kept counts and the validation accuracy along the first steps."""
    batches = _batches(_loader(ctx, seed, True))
    marks = sorted({m for m in MARKS if m <= steps} | {steps})
    out, done = [], 0
    for mark in [0] + marks:
        while done < mark:
            b = next(batches)
            alg.step(b[0], b[1])
            done += 1
        kept = {name: int(mod.mask.sum()) for name, mod in zip(alg.module_names, alg.modules)}
        out.append({"step": mark, "kept": kept, "empty_layers": [n for n, k in kept.items() if k == 0],
                    "val_acc": evaluate(alg.model, ctx, test=False).get("val_acc")})
    return out


def table(runs: List[Dict[str, Any]]) -> str:
    rows = ["| target | config | seeds | layers emptied at the last step (seeds) | val acc at step 0 % | "
            f"val acc at the last step % | empty filters of the largest layer | score grad empty / live there |",
            "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["target_sparsity"], r["config"]) for r in runs})
    for sp, cfg in keys:
        rs = [r for r in runs if r["target_sparsity"] == sp and r["config"] == cfg]
        emptied = sum(1 for r in rs if r["steps"][-1]["empty_layers"])
        acc0 = [100 * r["steps"][0]["val_acc"] for r in rs]
        acc1 = [100 * r["steps"][-1]["val_acc"] for r in rs]
        last = [max(r["gradient"], key=lambda L: L["numel"]) for r in rs]
        ratio = [L["grad_pruned_in_empty"] / L["grad_pruned_in_live"] for L in last
                 if L["grad_pruned_in_empty"] and L["grad_pruned_in_live"]]
        fmt = (lambda xs: "n/a" if not xs else f"{statistics.mean(xs):.2f}" + (
            f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""))
        rows.append(f"| {100 * sp:.1f}% | {cfg} | {len(rs)} | {emptied} / {len(rs)} | {fmt(acc0)} | {fmt(acc1)} | "
                    f"{fmt([L['empty_filters'] for L in last])} / {last[0]['filters']} | {fmt(ratio)} |")
    names = [L["layer"] for L in runs[0]["gradient"]] if runs else []
    rows += ["", "Weights each layer keeps (mean over seeds): first mask -> after the last step followed", "",
             "| target | config | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for sp, cfg in keys:
        rs = [r for r in runs if r["target_sparsity"] == sp and r["config"] == cfg]
        cells = [f"{statistics.mean(r['steps'][0]['kept'][n] for r in rs):.0f} -> "
                 f"{statistics.mean(r['steps'][-1]['kept'][n] for r in rs):.0f}" for n in names]
        rows.append(f"| {100 * sp:.1f}% | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(p, os.path.join(C.RESULTS_DIR, "layer-collapse-cpu"))
    p.add_argument("--rounds", default="12,15,18", help="IMP rounds whose sparsities are measured")
    p.add_argument("--steps", type=int, default=44, help="BiP steps followed (the preset's first evaluation point)")
    p.add_argument("--configs", default=",".join(configs({})), help="comma-separated subset of "
                   + ",".join(configs({})))
    p.add_argument("--tuned-from", default=os.path.join(C.RESULTS_DIR, "speedup-cpu-cpu", "speedup.json"),
                   help="speedup.json whose tuning chose BiP's configuration")
    args = p.parse_args(argv)
    try:
        rounds = sorted({int(r) for r in args.rounds.split(",") if r.strip()})
    except ValueError:
        p.error(f"--rounds: expected comma-separated integers, got {args.rounds!r}")
    if not rounds or min(rounds) < 1 or args.steps < 1:
        p.error("--rounds: expected rounds >= 1; --steps: expected >= 1")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(c not in configs({}) for c in names):
        p.error(f"--configs: expected a subset of {','.join(configs({}))}, got {args.configs!r}")
    try:
        with open(args.tuned_from) as f:
            chosen = json.load(f)["tuning"][METHOD]["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--tuned-from: {args.tuned_from} holds no tuning choice for {METHOD} ({e})")
    measured = {n: configs(chosen)[n] for n in names}  # in the order asked for
    t0 = time.monotonic()
    device = _device(args.device)
    ctx, cfg, _ = setup(args, study_config(args, tune="fixed"), device)
    if ctx is None:
        return 2
    env = C.environment(device)
    print(C.format_header(env, "BiP's global masks at high sparsity: the first steps (cpu regime)"))
    dense, runs = [], []
    for seed in range(cfg["seeds"]):
        pre = pretrain(ctx, seed)
        dense.append(dense_record(seed, pre, "final_sha256"))
        for rnd in rounds:
            sp = target_sparsity(rnd)
            for name, over in measured.items():
                hp = hparams(ctx, METHOD, over)
                # two instances: the gradient's forward pass would move the BatchNorm statistics
                grad = first_gradient(ctx, make_algorithm(ctx, METHOD, _model_from(ctx, pre["final"]), sp, hp), seed)
                torch.manual_seed(seed)
                path = first_steps(ctx, make_algorithm(ctx, METHOD, _model_from(ctx, pre["final"]), sp, hp), seed,
                                   args.steps)
                C.log(f"[collapse] seed {seed} {100 * sp:.1f}% {name}: emptied {path[-1]['empty_layers']} "
                      f"val {path[0]['val_acc']} -> {path[-1]['val_acc']}")
                runs.append({"seed": seed, "round": rnd, "target_sparsity": sp, "config": name, "hparams": hp,
                             "dense_sha256": pre.get("final_sha256"), "gradient": grad, "steps": path})
    md = table(runs)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layer_collapse.md"), "w") as f:
        f.write(md + "\n")
    C.write_json(os.path.join(args.out, "layer_collapse.json"), benchmark="layer_collapse", env=env,
                 config=dict(cfg, method=METHOD, rounds=rounds, steps_followed=args.steps, tuned_from=args.tuned_from,
                             configs=measured, device=str(device)),
                 rows=[], extra={"dense": dense, "runs": runs,
                                 "provenance": {"commit": ctx.code["commit"], "dirty": ctx.code["dirty"],
                                                "run_commits": sorted({(d.get("code") or {}).get("commit", "unknown")
                                                                       for d in dense})},
                                 "wall_seconds": time.monotonic() - t0})
    print(f"wrote {os.path.join(args.out, 'layer_collapse.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
