"""A MACs budget against uniform group sparsity, at equal MACs (the cpu regime of benchmarks/structured.py).

A user asks for a model with a fraction of the dense model's MACs. Three ways to get it, all with
removable channels (compacted models, timed):

- **uniform** (``BiP`` / ``OMP`` with ``structure="group"`` and a sparsity): the same fraction of
  every coupled channel group; the sparsity is the smallest one whose compacted model needs at most
  the requested MACs (found by bisection on the dense architecture: MACs depend only on how many
  channels each group keeps);
- **budget** (``macs=f``, :mod:`bip_fast.masks.budget`): channels ranked across all groups by
  score per MAC, every producing layer keeping at least one;
- **Torch-Pruning's own magnitude pruning** (``tp.pruner.MagnitudePruner``, L2 group importance,
  ``global_pruning=True`` so that it too ranks channels across layers, the classifier ignored,
  at most 90% of a layer's channels): its pruning ratio is the smallest one whose pruned model
  needs at most the requested MACs (bisection); the pruned plain model then retrains like OMP.

Every method retrains or trains its schedule of the speedup preset (BiP 349 steps, OMP and TP 558
steps retraining) from the dense model of each seed (0-2). Hyper-parameters: each method's grid of
benchmarks/speedup.py (4 configurations: lr x weight decay for OMP and TP, lr x score lr for BiP) at
the first target on seed 0, the highest final *validation* accuracy wins; the test set only reports.
Paired per seed: each budget row against its uniform row, every row against Torch-Pruning's.
Latency: the compacted (or TP-pruned) model, interleaved with the dense model and a copy of it
(the control), ``--threads`` CPU threads, batch 1 and 16 (benchmarks/compact.py's protocol).

    python benchmarks/macs_budget.py --data-dir ../shared/data/cifar10 --resume --max-minutes 60
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

try:  # imported as part of a package
    from . import _common as C
    from ._speedup_loop import (MixedCode, Segment, Stop, _build, _load_result, _save_result, _warmup, execute,
                                stop_on_signals)
    from ._speedup_presets import GRIDS
    from ._speedup_runs import _device, _model_from, run_arguments, config_tag, hparams, pretrain, setup, study_config
    from ._speedup_stats import by_seed, paired, paired_diff
    from ._structured_runs import example_input, inference_cost, latencies
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_loop import (  # type: ignore[no-redef]
        MixedCode, Segment, Stop, _build, _load_result, _save_result, _warmup, execute, stop_on_signals)
    from _speedup_presets import GRIDS  # type: ignore[no-redef]
    from _speedup_runs import _device, _model_from, run_arguments, config_tag, hparams, pretrain, setup, study_config  # type: ignore[no-redef]
    from _speedup_stats import by_seed, paired, paired_diff  # type: ignore[no-redef]
    from _structured_runs import example_input, inference_cost, latencies  # type: ignore[no-redef]

import bip_fast
from bip_fast.compaction import count_macs

# name -> (algorithm, how the target is met)
METHODS = {"bip_uniform": ("bip", "uniform"), "bip_macs": ("bip", "macs"),
           "omp_uniform": ("omp", "uniform"), "omp_macs": ("omp", "macs"), "tp_magnitude": ("tp", "global")}
LIKE = {"bip": "bip_alternating", "omp": "omp", "tp": "omp"}  # base settings and grid of benchmarks/speedup.py
TARGETS = (0.5, 0.25)
TP_MAX_RATIO = 0.9
# ResNet-8 with 1x1-conv projection shortcuts: Torch-Pruning's pruner does not couple the zero-padding
# (option A) shortcuts of the cpu preset's ResNet-8 (its pruned model fails in forward, "mat1 and mat2
# shapes cannot be multiplied"), so every method of this benchmark runs on the option-B variant.
ARCH = "resnet8b"
BISECT_STEPS = 14


def _macs_ratio(model: torch.nn.Module, ex: torch.Tensor, dense_macs: int) -> float:
    return count_macs(model.eval(), ex[:1]) / dense_macs


def _bisect(macs_at, target: float, hi: float = 0.999) -> float:
    """Smallest x in [0, hi] with macs_at(x) <= target (macs_at non-increasing in x)."""
    lo = 0.0
    if macs_at(hi) > target:
        raise ValueError(f"target {target}: not reachable (MACs ratio {macs_at(hi):.3f} at {hi})")
    for _ in range(BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if macs_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def uniform_sparsity(ctx, target: float) -> float:
    """The smallest uniform group sparsity whose compacted dense architecture needs at most ``target``
    of the dense MACs."""
    ex = example_input(ctx)
    dense = ctx.plain_builder()
    dense_macs = count_macs(dense.eval(), ex[:1])

    def at(s: float) -> float:
        m = copy.deepcopy(dense)
        bip_fast.attach_groups(m, ex)
        alg = bip_fast.OMP(m, s, structure="group")
        return _macs_ratio(bip_fast.compact(alg.model.eval(), ex), ex, dense_macs)

    return _bisect(at, target)


def tp_prune(model: torch.nn.Module, ex: torch.Tensor, target: float, ratio: Optional[float] = None):
    """Torch-Pruning's magnitude pruner at the smallest global ratio meeting ``target`` MACs
    (``ratio``: that ratio, found before for the same weights: no bisection)."""
    import torch_pruning as tp

    dense_macs = count_macs(model.eval(), ex[:1])

    def pruned(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model).eval()
        cls = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        pr = tp.pruner.MagnitudePruner(m, ex[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=TP_MAX_RATIO,
                                       ignored_layers=[cls])
        pr.step()
        return m

    if ratio is None:
        ratio = _bisect(lambda r: _macs_ratio(pruned(r), ex, dense_macs), target, hi=TP_MAX_RATIO)
    return pruned(ratio), ratio


def make_algorithm(ctx, method: str, pre: Dict[str, Any], target: float, hp: Dict[str, Any]):
    algo, how = METHODS[method]
    st, ex = ctx.steps, example_input(ctx).to(ctx.device)
    model = _model_from(ctx, pre["final"])
    if algo == "tp":
        key = (pre["seed"], target)  # the warm-up and the run prune the same weights: bisect once
        plain, ctx.tp_ratio[key] = tp_prune(bip_fast.finalize(model).cpu(), ex.cpu(), target, ctx.tp_ratio.get(key))
        return bip_fast.Dense(plain.to(ctx.device).train(), lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=0.9,
                              total_steps=st["omp"])
    bip_fast.attach_groups(model, ex)
    goal = {"macs": target} if how == "macs" else {"sparsity": ctx.uniform[target]}
    kw = dict({k: v for k, v in hp.items() if k != "structure"}, structure="group", momentum=0.9)
    if algo == "bip":
        return bip_fast.BiP(model, **goal, total_steps=st["bip"], **kw)
    return bip_fast.OMP(model, **goal, total_steps=st["omp"], **kw)


def run(ctx, method: str, target: float, seed: int, pre: Dict[str, Any], hp: Dict[str, Any]) -> Dict[str, Any]:
    run_id = f"{method}-m{round(100 * target)}-seed{seed}-{config_tag(hp)}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    algo = METHODS[method][0]
    bilevel = algo == "bip"
    pre = dict(pre, seed=seed)

    def make():
        return make_algorithm(ctx, method, pre, target, hp)

    _warmup(ctx, method, make, bilevel)
    alg = make()
    total = ctx.steps["bip"] if algo == "bip" else ctx.steps["omp"]
    C.log(f"[macs] {run_id}: {total} steps")
    state = execute(ctx, run_id, alg, [Segment("bip" if bilevel else "retrain", total)], seed, bilevel, eval_at=[total])
    last = state["curve"][-1]
    ex = example_input(ctx)
    if algo == "tp":
        model = alg.model.cpu().eval()
        dense = ctx.plain_builder().eval()
        lat = latencies({"dense": dense, "dense (copy)": copy.deepcopy(dense), "compacted": model}, ex, ctx)
        cost = {"structure": "torch-pruning", "macs": count_macs(model, ex[:1]),
                "params": sum(p.numel() for p in model.parameters()), "latency_ms": lat["compacted"],
                "dense_latency_ms": lat["dense"], "control_rel_diff": lat["control_rel_diff"],
                "tp_ratio": ctx.tp_ratio[(seed, target)]}
        cost["latency_ratio"] = {b: cost["latency_ms"][b] / lat["dense"][b] for b in cost["latency_ms"]}
        cost["macs_ratio"] = cost["macs"] / count_macs(dense, ex[:1])
    else:
        cost = inference_cost(ctx, alg.model, "group")
    result = {"method": method, "seed": seed, "target_macs": target, "test_acc": last["test_acc"],
              "val_acc": last.get("val_acc"), "train_seconds": state["train_seconds"], "steps": total, "hparams": hp,
              "uniform_sparsity": ctx.uniform[target] if METHODS[method][1] == "uniform" else None, "inference": cost}
    C.log(f"[macs] {run_id}: MACs {cost['macs_ratio']:.3f} of dense, acc {result['test_acc']:.4f}")
    _save_result(ctx, run_id, result)
    return result


def tune(ctx, methods: List[str], pre: Dict[str, Any], target: float) -> Dict[str, Any]:
    out = {}
    for m in methods:
        like = LIKE[METHODS[m][0]]
        tried = []
        for cfg in GRIDS[like]:
            hp = hparams(ctx, like, cfg)
            got = run(ctx, m, target, 0, pre, hp)
            tried.append({"config": cfg, "hparams": hp, "val_acc": got["val_acc"], "test_acc": got["test_acc"]})
        best = max(range(len(tried)), key=lambda i: (tried[i]["val_acc"], -i))
        ctx.chosen[m] = tried[best]["hparams"]
        out[m] = {"configs": tried, "chosen": tried[best]["config"], "chosen_hparams": tried[best]["hparams"],
                  "rule": f"highest final validation accuracy at {target:g} of the dense MACs, seed 0 (ties: the "
                          f"earlier configuration); the choice serves every target and seed"}
    return out


def aggregate(records: List[Dict[str, Any]], methods: List[str], targets: List[float]) -> List[Dict[str, Any]]:
    rows = []
    for t in targets:
        at = {m: [r for r in records if r["method"] == m and r["target_macs"] == t] for m in methods}
        for m in methods:
            rs = at[m]
            if not rs:
                continue
            test, val = [r["test_acc"] for r in rs], [r["val_acc"] for r in rs]
            inf = [r["inference"] for r in rs]
            row = {"method": m, "target_macs": t, "seeds": [r["seed"] for r in rs],
                   "test_acc": statistics.mean(test), "test_acc_std": statistics.stdev(test) if len(test) > 1 else None,
                   "val_acc": statistics.mean(val), "macs_ratio": statistics.mean(i["macs_ratio"] for i in inf),
                   "params": statistics.mean(i["params"] for i in inf),
                   "latency_ratio": {b: statistics.median(i["latency_ratio"][b] for i in inf) for b in inf[0]["latency_ratio"]},
                   "latency_ms": {b: statistics.median(i["latency_ms"][b] for i in inf) for b in inf[0]["latency_ms"]},
                   "control_rel_diff": {b: max(i["control_rel_diff"][b] for i in inf) for b in inf[0]["control_rel_diff"]},
                   "uniform_sparsity": rs[0].get("uniform_sparsity"), "hparams": rs[0]["hparams"]}
            base = m.replace("_macs", "_uniform") if m.endswith("_macs") else None
            if base in at and at[base]:
                row["paired_vs_uniform"] = paired(paired_diff(by_seed(rs, "test_acc"), by_seed(at[base], "test_acc")))
            if m != "tp_magnitude" and at.get("tp_magnitude"):
                row["paired_vs_tp"] = paired(paired_diff(by_seed(rs, "test_acc"), by_seed(at["tp_magnitude"], "test_acc")))
            rows.append(row)
    return rows


def _pc(p: Optional[Dict[str, Any]]) -> str:
    if not p:
        return ""
    if p.get("ci95") is None:
        return f"{p['mean']:+.2f} (1 seed)"
    return f"{p['mean']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] ({p['positive']}/{p['n']} +)"


def table(rows: List[Dict[str, Any]]) -> str:
    out = ["| MACs target | method | MACs (x dense) | params K | test acc % (± std) | val acc % | budget vs uniform, "
           "paired (95% CI) | vs Torch-Pruning, paired | CPU ms b1 (x dense) | CPU ms b16 (x dense) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = "" if r["test_acc_std"] is None else f" ± {100 * r['test_acc_std']:.2f}"
        lat = [f"{r['latency_ms'][b]:.2f} ({r['latency_ratio'][b]:.2f})" for b in ("1", "16") if b in r["latency_ms"]]
        out.append(f"| {r['target_macs']:g} | {r['method']} | {r['macs_ratio']:.3f} | {r['params'] / 1e3:.1f} | "
                   f"{100 * r['test_acc']:.2f}{sd} ({len(r['seeds'])}) | {100 * r['val_acc']:.2f} | "
                   f"{_pc(r.get('paired_vs_uniform'))} | {_pc(r.get('paired_vs_tp'))} | " + " | ".join(lat) + " |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(p, os.path.join(C.RESULTS_DIR, "macs-budget-cpu"))
    p.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS), help="MACs fractions of dense")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the latency measurement")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
    try:
        targets = [float(t) for t in args.targets.split(",")]
    except ValueError:
        p.error(f"--targets: expected comma-separated fractions, got {args.targets!r}")
    if not targets or not all(0.0 < t < 1.0 for t in targets):
        p.error(f"--targets: expected fractions in (0, 1), got {args.targets}")
    t0 = time.monotonic()
    device = _device(args.device)
    ctx, cfg, data_dir = setup(args, study_config(args, tune="grid", arch=ARCH), device)
    if ctx is None:
        return 2
    ctx.plain_builder = lambda: _build(cfg["arch"])
    ctx.latency = {"batches": [1, 16], "threads": args.threads, "min_run_time": 0.05 if args.quick else 0.5}
    ctx.tp_ratio = {}
    ctx.uniform = {t: uniform_sparsity(ctx, t) for t in targets}
    env = C.environment(device)
    print(C.format_header(env, "A MACs budget against uniform group sparsity, at equal MACs (cpu regime)"))
    print(f"- uniform group sparsity meeting each target: {ctx.uniform}")
    records: List[Dict[str, Any]] = []
    tuning: Dict[str, Any] = {}
    stopped = None
    with stop_on_signals(ctx):
        try:
            pres = {s: pretrain(ctx, s) for s in range(cfg["seeds"])}
            tuning = tune(ctx, methods, pres[0], targets[0])
            for seed in range(cfg["seeds"]):
                for t in targets:
                    for m in methods:
                        records.append(run(ctx, m, t, seed, pres[seed], ctx.chosen[m]))
        except Stop as s:
            stopped = str(s)
        except MixedCode as e:
            print(f"--resume: {e}", file=sys.stderr)
            return 2
    rows = aggregate(records, methods, targets)
    md = table(rows)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "macs_budget.md"), "w") as f:
        f.write(md + "\n")
    codes = sorted({(r.get("code") or ctx.code).get("commit", "unknown") for r in records})
    again = (f"python benchmarks/macs_budget.py --resume --data-dir {args.data_dir or '$BIP_FAST_DATA'}"
             + ("" if args.max_minutes is None else f" --max-minutes {args.max_minutes:g}")
             + ("" if targets == list(TARGETS) else f" --targets {args.targets}")
             + ("" if methods == list(METHODS) else f" --methods {args.methods}")
             + ("" if args.seeds == 3 else f" --seeds {args.seeds}"))
    path = os.path.join(args.out, "macs_budget.json")
    C.write_json(path, benchmark="macs_budget", env=env,
                 config=dict(cfg, targets=targets, methods={m: METHODS[m] for m in methods}, steps=ctx.steps,
                             device=str(device), uniform_sparsity={str(k): v for k, v in ctx.uniform.items()},
                             tp={"importance": "MagnitudeImportance(p=2)", "global_pruning": True,
                                 "max_pruning_ratio": TP_MAX_RATIO, "ignored": "classifier"},
                             latency=ctx.latency),
                 rows=[], extra={"summary": rows, "tuning": tuning, "records": records, "complete": stopped is None,
                                 "stopped_in": stopped, "continue_command": again,
                                 "provenance": {"commit": ctx.code["commit"], "dirty": ctx.code["dirty"],
                                                "run_commits": codes},
                                 "wall_seconds": time.monotonic() - t0})
    print(f"wrote {path}" + (f" ({ctx.stop_reason()} in {stopped}; rerun with --resume)" if stopped else ""))
    return ctx.exit_status()


if __name__ == "__main__":
    sys.exit(main())
