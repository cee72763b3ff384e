"""Why BiP with per-layer filter masks falls behind at high filter sparsity: measurements and the
remedies they point to, on the validation split (the regime of benchmarks/structured.py).

Measurements and experiments, per seed (0-2 by default), at ``--sparsity`` (80%) filter sparsity:

1. **The score gradient of a pruned filter.** BiP's first mask (the filter projection of |θ| of the
   dense model), one forward/backward on a training batch in train mode, and per conv layer the
   mean L2 norm of the score gradient G_s = sgn(s)·(θ⊙g − m⊙g⊙g) over its pruned filters against
   its kept ones. A pruned filter outputs zeros; the BatchNorm after it normalises a channel of
   batch variance 0 by sqrt(0 + eps), not by a standard deviation, so where the gradient reaches it
   (BatchNorm's shift β > 0 before a ReLU, or a residual addition) it is scaled by γ/sqrt(eps)
   (γ/0.0032 at eps 1e-5) instead of γ/σ. A pruned filter's scores then move faster than a kept
   filter's, re-enter the top-k, and the mask keeps moving.
2. **How the mask moves** (``execute(track_masks=10)``): the fraction of filters whose kept state
   changes in each tenth of training, for BiP and, for reference, Hydra's score phase.
3. **Remedies**, every one an extra configuration on the same seeds and dense models: the mask
   frozen for the last 25% or 50% of the schedule (``BiP(mask_freeze=...)``: θ trains on the filters
   the mask settled on), and the score learning rate scaled down 10x for filters. Their final
   validation accuracy decides; the test set only reports. L1-norm filter pruning (the best
   baseline at 80% in structured.json) runs beside them, with its own configuration and the same
   number of extra configurations (learning rates 0.05 and 0.2 beside its 0.1, weight decay 1e-4 and
   1e-3 beside its 5e-4), so that neither side gets more tries;
4. **The remedy measurement 1 points to** (``bip_bn_corrected``, ``BiP(bn_correction=True)``): a
   pruned filter's score gradient scaled by sqrt(eps / (σ² + eps)), σ² the batch variance its output
   would have switched on, as if BatchNorm normalised it by its own spread rather than by sqrt(eps).
5. **One score per filter** (``bip_unit_scores``, ``BiP(unit_scores=True)``, alone and with the
   BatchNorm correction, ``bip_unit_bn``): the projection ranks filters by the L2 norm of their
   scores, so per-weight scores are a freedom the mask cannot use; one shared score per filter
   moves by the mean of its weights' score gradients. L1-norm gets the same two extra
   configurations (learning rate 0.2, its best, with weight decay 1e-4 and 1e-3).
6. **A control** (``--variants l1_bip_steps``, not among the choices): L1-norm pruning retrained for
   BiP's 349 steps instead of its 558, which separates the length of training from the mask.

Output (``--out``, default benchmarks/results/filter-deficit-cpu/): filter_deficit.json (config,
gradient ratios, runs with their mask movement, provenance) and filter_deficit.md. Resumable like
structured.py (``--resume``, ``--max-minutes``).

    python benchmarks/filter_deficit.py --data-dir ../shared/data/cifar10 --resume --max-minutes 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from bip_fast.masks import kept_units

try:  # imported as part of a package
    from . import _common as C
    from ._speedup_loop import MixedCode, Stop, stop_on_signals
    from ._speedup_runs import _device, _model_from, run_arguments, pretrain, setup, study_config
    from ._structured_runs import make_algorithm, method_hparams, run_one_shot
    from ._speedup_stats import by_seed, paired, paired_diff
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_loop import MixedCode, Stop, stop_on_signals  # type: ignore[no-redef]
    from _speedup_runs import _device, _model_from, run_arguments, pretrain, setup, study_config  # type: ignore[no-redef]
    from _structured_runs import make_algorithm, method_hparams, run_one_shot  # type: ignore[no-redef]
    from _speedup_stats import by_seed, paired, paired_diff  # type: ignore[no-redef]

# The structured comparison's chosen configurations (benchmarks/results/structured-cpu-val1k, grid tuning
# at 50% filter sparsity on validation): BiP lr 0.1 with the scaled score lr, L1-norm lr 0.1 wd 5e-4.
BASE = {"bip_filter": {"lr": 0.1, "score_lr": "scaled"}, "l1_filter": {"lr": 0.1, "weight_decay": 5e-4}}
# name -> (method, configuration): each method's base settings and its extra configurations
VARIANTS = {
    "bip": ("bip_filter", {}),
    "bip_freeze25": ("bip_filter", {"mask_freeze": 0.25}),
    "bip_freeze50": ("bip_filter", {"mask_freeze": 0.5}),
    "bip_score_lr_div10": ("bip_filter", {"score_lr_scale": 0.1}),
    "bip_bn_corrected": ("bip_filter", {"bn_correction": True}),
    "bip_unit_scores": ("bip_filter", {"unit_scores": True}),
    "bip_unit_bn": ("bip_filter", {"unit_scores": True, "bn_correction": True}),
    "l1": ("l1_filter", {}),
    "l1_lr0.05": ("l1_filter", {"lr": 0.05}),
    "l1_lr0.2": ("l1_filter", {"lr": 0.2}),
    "l1_wd1e-4": ("l1_filter", {"weight_decay": 1e-4}),
    "l1_wd1e-3": ("l1_filter", {"weight_decay": 1e-3}),
    "l1_lr0.2_wd1e-4": ("l1_filter", {"lr": 0.2, "weight_decay": 1e-4}),
    "l1_lr0.2_wd1e-3": ("l1_filter", {"lr": 0.2, "weight_decay": 1e-3}),
    "hydra": ("hydra_filter", {}),
    # a control, not a configuration to choose: L1-norm retrained for BiP's 349 steps instead of 558
    "l1_bip_steps": ("l1_filter", {"x_steps": "bip"}),
}
CONTROLS = ("l1_bip_steps",)

HYDRA_BASE = {"score_lr": "scaled", "lr": 0.1}


def _config(ctx, variant: str) -> Dict[str, Any]:
    method, extra = VARIANTS[variant]
    cfg = dict(HYDRA_BASE if method == "hydra_filter" else BASE[method])
    scale = extra.get("score_lr_scale")
    cfg.update({k: v for k, v in extra.items() if k != "score_lr_scale"})
    hp = method_hparams(ctx, method, cfg)
    if scale is not None:
        hp["score_lr"] = hp["score_lr"] * scale
    return hp


def _score_grads(ctx, pre: Dict[str, Any], sparsity: float, seed: int, corrected: bool):
    alg = make_algorithm(ctx, "bip_filter", _model_from(ctx, pre["final"]), sparsity,
                         _config(ctx, "bip_bn_corrected" if corrected else "bip"))
    model = alg.model.train()
    x, y = next(iter(ctx.data.train_loader(ctx.cfg["batch_size"], seed=1000 * seed + 7, augment=False)))
    torch.nn.functional.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device)).backward()
    held = {alg.module_names[i] for i in alg.dense_outputs}
    return [(name, mod.scores.grad.flatten(1).norm(dim=1), kept_units(mod.mask))
            for name, mod in zip(alg.module_names, alg.modules) if name not in held]


def grad_ratio(ctx, pre: Dict[str, Any], sparsity: float, seed: int) -> Dict[str, Any]:
    """Measurement 1: per conv layer, mean L2 norm of the score gradient per pruned filter over that
    per kept filter, at BiP's first filter mask of the dense model of ``seed`` (and the same with
    ``BiP(bn_correction=True)``)."""
    layers = []
    raw = _score_grads(ctx, pre, sparsity, seed, False)
    fixed = _score_grads(ctx, pre, sparsity, seed, True)
    for (name, g, kept), (_, gc, _) in zip(raw, fixed):
        if kept.all() or not kept.any():
            continue
        gk = float(g[kept].mean())
        gp, gpc = float(g[~kept].mean()), float(gc[~kept].mean())
        layers.append({"layer": name, "filters": int(kept.numel()), "kept": int(kept.sum()),
                       "pruned_grad": gp, "kept_grad": gk, "ratio": gp / gk if gk > 0 else None,
                       "ratio_bn_corrected": gpc / gk if gk > 0 else None,
                       "pruned_zero_grad": int((g[~kept] == 0).sum())})
    return {"seed": seed, "layers": layers}


def run_variant(ctx, variant: str, sparsity: float, seed: int, pre: Dict[str, Any]) -> Dict[str, Any]:
    method = VARIANTS[variant][0]
    hp = _config(ctx, variant)
    steps = ctx.steps
    if hp.get("x_steps"):  # the control: retrain for another method's number of steps
        ctx.steps = dict(steps, omp=steps[hp["x_steps"]])
    try:
        rec = run_one_shot(ctx, method, sparsity, seed, pre, hp)
    finally:
        ctx.steps = steps
    return dict(rec, variant=variant)


def _flip_tenths(runs: List[Dict[str, Any]]) -> Optional[List[float]]:
    got = [r["mask_flips"]["filters"] for r in runs if r.get("mask_flips")]
    if not got:
        return None
    return [statistics.mean(col) for col in zip(*got)]


def summarise(runs: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    rows = []
    ref = runs.get("bip", [])
    for v, rs in runs.items():
        if not rs:
            continue
        val = [r["val_acc"] for r in rs]
        test = [r["test_acc"] for r in rs]
        rows.append({"variant": v, "method": VARIANTS[v][0], "hparams": rs[0]["hparams"], "seeds": [r["seed"] for r in rs],
                     "val_acc": statistics.mean(val), "val_acc_std": statistics.stdev(val) if len(val) > 1 else None,
                     "test_acc": statistics.mean(test), "test_acc_std": statistics.stdev(test) if len(test) > 1 else None,
                     "filter_sparsity": statistics.mean(r["inference"]["filter_sparsity"] for r in rs),
                     "flips_per_tenth": _flip_tenths(rs),
                     "paired_test_vs_bip": None if v == "bip" else paired(paired_diff(by_seed(rs, "test_acc"),
                                                                                      by_seed(ref, "test_acc"))),
                     "paired_val_vs_bip": None if v == "bip" else paired(paired_diff(by_seed(rs, "val_acc"),
                                                                                     by_seed(ref, "val_acc")))})
    return rows


def verdict(rows: List[Dict[str, Any]], runs: Dict[str, List[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Each side's configuration chosen by mean validation accuracy over the seeds (BiP among the
    variants of its that ran, L1-norm likewise, controls excepted; ties: the earlier), then
    the chosen BiP against the chosen L1-norm on the test set, paired per seed; and the deficit
    itself (both base configurations)."""
    def chosen(method: str) -> Optional[Dict[str, Any]]:
        mine = [r for r in rows if r["method"] == method and r["variant"] not in CONTROLS]
        return max(mine, key=lambda r: (r["val_acc"], -mine.index(r))) if mine else None

    b, l1 = chosen("bip_filter"), chosen("l1_filter")
    if b is None or l1 is None or "bip" not in runs or "l1" not in runs:
        return None
    std = l1["test_acc_std"]
    tries = {m: sum(r["method"] == m and r["variant"] not in CONTROLS for r in rows) for m in ("bip_filter", "l1_filter")}
    return {"rule": "per side, the configuration with the highest mean validation accuracy over the seeds "
                    f"({tries['bip_filter']} BiP, {tries['l1_filter']} L1-norm)",
            "bip_choice": b["variant"], "l1_choice": l1["variant"],
            "bip_test_acc": b["test_acc"], "l1_test_acc": l1["test_acc"], "l1_test_acc_std": std,
            "within_l1_std": None if std is None else abs(b["test_acc"] - l1["test_acc"]) <= std,
            "paired_chosen_bip_vs_l1": paired(paired_diff(by_seed(runs[b["variant"]], "test_acc"),
                                                          by_seed(runs[l1["variant"]], "test_acc"))),
            "paired_base_bip_vs_l1": paired(paired_diff(by_seed(runs["bip"], "test_acc"), by_seed(runs["l1"], "test_acc"))),
            # the control: how much of the gap is L1-norm's longer retraining
            **({} if not runs.get("l1_bip_steps") else {
                "paired_l1_bip_steps_vs_l1": paired(paired_diff(by_seed(runs["l1_bip_steps"], "test_acc"),
                                                                by_seed(runs["l1"], "test_acc"))),
                "paired_chosen_bip_vs_l1_bip_steps": paired(paired_diff(by_seed(runs[b["variant"]], "test_acc"),
                                                                        by_seed(runs["l1_bip_steps"], "test_acc")))})}


def table(rows: List[Dict[str, Any]], grads: List[Dict[str, Any]]) -> str:
    out = ["| variant | val acc % (± std) | test acc % (± std) | test vs BiP, paired (95% CI) | filters flipped per tenth of training (%) |",
           "|---|---|---|---|---|"]
    for r in rows:
        p = r["paired_test_vs_bip"]
        pc = "" if not p or p.get("ci95") is None else f"{p['mean']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
        fl = "" if r["flips_per_tenth"] is None else " ".join(f"{100 * f:.1f}" for f in r["flips_per_tenth"])
        sd = lambda v: "" if v is None else f" ± {100 * v:.2f}"  # noqa: E731
        out.append(f"| {r['variant']} | {100 * r['val_acc']:.2f}{sd(r['val_acc_std'])} | "
                   f"{100 * r['test_acc']:.2f}{sd(r['test_acc_std'])} | {pc} | {fl} |")
    out += ["", "| seed | layer | filters kept / all | score-gradient norm, pruned / kept filter | the same, BN-corrected "
                "| pruned filters with zero gradient |", "|---|---|---|---|---|---|"]
    for g in grads:
        for L in g["layers"]:
            ratio = "n/a" if L["ratio"] is None else f"{L['ratio']:.1f}x"
            fixed = "n/a" if L["ratio_bn_corrected"] is None else f"{L['ratio_bn_corrected']:.2f}x"
            out.append(f"| {g['seed']} | {L['layer']} | {L['kept']} / {L['filters']} | {ratio} | {fixed} | "
                       f"{L['pruned_zero_grad']} / {L['filters'] - L['kept']} |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(p, os.path.join(C.RESULTS_DIR, "filter-deficit-cpu"))
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in CONTROLS),
                   help="comma-separated subset of " + ",".join(VARIANTS))
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; valid: {', '.join(VARIANTS)}")
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity: expected a value in (0, 1), got {args.sparsity}")
    if "bip" not in variants:
        variants.insert(0, "bip")  # the reference of every paired row
    t0 = time.monotonic()
    device = _device(args.device)
    ctx, cfg, data_dir = setup(args, study_config(args, tune="fixed"), device)
    if ctx is None:
        return 2
    ctx.sparsities = [args.sparsity]
    ctx.latency = {"batches": [1], "threads": 2, "min_run_time": 0.05, "rounds": 2}  # compaction check; latency not reported
    env = C.environment(device)
    print(C.format_header(env, "BiP's filter-mask deficit: measurements and remedies (cpu regime)"))
    grads: List[Dict[str, Any]] = []
    runs: Dict[str, List[Dict[str, Any]]] = {v: [] for v in variants}
    stopped = None
    with stop_on_signals(ctx):
        try:
            for seed in range(cfg["seeds"]):
                pre = pretrain(ctx, seed)
                grads.append(grad_ratio(ctx, pre, args.sparsity, seed))
                for v in variants:
                    runs[v].append(run_variant(ctx, v, args.sparsity, seed, pre))
        except Stop as s:
            stopped = str(s)
        except MixedCode as e:
            print(f"--resume: {e}", file=sys.stderr)
            return 2
    rows = summarise(runs)
    decided = verdict(rows, runs)
    md = table(rows, grads)
    if decided:
        p_ = decided["paired_chosen_bip_vs_l1"]
        md += (f"\n\nChosen on validation: BiP {decided['bip_choice']} {100 * decided['bip_test_acc']:.2f}% test, "
               f"L1-norm {decided['l1_choice']} {100 * decided['l1_test_acc']:.2f}% test; paired BiP - L1 "
               f"{p_['mean']:+.2f} points" + ("" if p_.get("ci95") is None else
                                              f" [{p_['ci95'][0]:+.2f}, {p_['ci95'][1]:+.2f}] ({p_['verdict']})"))
        for key, what in (("paired_l1_bip_steps_vs_l1", "control: L1-norm retrained for BiP's steps - L1-norm"),
                          ("paired_chosen_bip_vs_l1_bip_steps", "chosen BiP - L1-norm retrained for BiP's steps")):
            q = decided.get(key)
            if q:
                md += f"\n{what}: {q['mean']:+.2f} points" + ("" if q.get("ci95") is None else
                                                             f" [{q['ci95'][0]:+.2f}, {q['ci95'][1]:+.2f}]")
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "filter_deficit.md"), "w") as f:
        f.write(md + "\n")
    codes = {(r.get("code") or ctx.code).get("commit", "unknown") for rs in runs.values() for r in rs}
    again = (f"python benchmarks/filter_deficit.py --resume --data-dir {args.data_dir or '$BIP_FAST_DATA'}"
             + ("" if args.max_minutes is None else f" --max-minutes {args.max_minutes:g}")
             + ("" if args.variants == p.get_default("variants") else f" --variants {args.variants}")
             + ("" if args.out == p.get_default("out") else f" --out {args.out}")
             + ("" if args.seeds == 3 else f" --seeds {args.seeds}"))
    C.write_json(os.path.join(args.out, "filter_deficit.json"), benchmark="filter_deficit", env=env,
                 config=dict(cfg, sparsity=args.sparsity, variants={v: VARIANTS[v] for v in variants}, steps=ctx.steps,
                             device=str(device)),
                 rows=[], extra={"summary": rows, "verdict": decided, "grad_ratios": grads, "runs": runs, "complete": stopped is None,
                                 "stopped_in": stopped, "continue_command": again,
                                 "provenance": {"commit": ctx.code["commit"], "dirty": ctx.code["dirty"],
                                                "run_commits": sorted(codes)},
                                 "wall_seconds": time.monotonic() - t0})
    print(f"wrote {os.path.join(args.out, 'filter_deficit.json')}" + (f" ({ctx.stop_reason()} in {stopped}; rerun with --resume)" if stopped else ""))
    return ctx.exit_status()


if __name__ == "__main__":
    sys.exit(main())
