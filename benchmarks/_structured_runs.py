"""The runs of ``benchmarks/structured.py``: the methods of the structured comparison (an algorithm
and a mask structure each), their tuning, their resumable runs on the loop of ``_speedup_loop``,
and what each pruned model costs at inference on the CPU: its compacted model (latency, MACs,
parameters), timed interleaved with the dense and the masked model."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

try:  # imported as part of a package (python -m benchmarks.structured)
    from . import _common as C
    from ._speedup_loop import Ctx, Segment, _build, _load_result, _save_result, _warmup, evaluate, execute
    from ._speedup_presets import GRIDS
    from ._speedup_runs import _load_plain, _model_from, config_tag, hparams
    from .compact import timed_session
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_loop import (  # type: ignore[no-redef]
        Ctx, Segment, _build, _load_result, _save_result, _warmup, evaluate, execute)
    from _speedup_presets import GRIDS  # type: ignore[no-redef]
    from _speedup_runs import _load_plain, _model_from, config_tag, hparams  # type: ignore[no-redef]
    from compact import timed_session  # type: ignore[no-redef]

import bip_fast
from bip_fast.compaction import count_macs
from bip_fast.masks import kept_units
from bip_fast.nn import masked_modules

# name -> (algorithm, mask structure, the method of benchmarks/speedup.py whose base settings and
# grid it takes, extra constructor arguments)
METHODS: Dict[str, Tuple[str, str, str, Dict[str, Any]]] = {
    "bip_group": ("bip", "group", "bip_alternating", {}),
    "bip_filter": ("bip", "filter", "bip_alternating", {}),
    # BiP with a pruned filter's score gradient taken as BatchNorm would normalise it switched on
    # (BiP(bn_correction=True); benchmarks/filter_deficit.py measured why)
    "bip_filter_bn": ("bip", "filter", "bip_alternating", {"bn_correction": True}),
    # ... and with one shared score per filter too (BiP(unit_scores=True)): the best BiP on
    # validation in benchmarks/results/filter-deficit-cpu-unit/
    "bip_filter_unit_bn": ("bip", "filter", "bip_alternating", {"bn_correction": True, "unit_scores": True}),
    "imp_filter": ("imp", "filter", "imp", {}),
    "omp_filter": ("omp", "filter", "omp", {}),
    "hydra_filter": ("hydra", "filter", "hydra", {}),
    "l1_filter": ("omp", "filter", "omp", {"filter_norm": "l1"}),
    # the baselines on removable group masks (not in the default list)
    "imp_group": ("imp", "group", "imp", {}),
    "omp_group": ("omp", "group", "omp", {}),
    "hydra_group": ("hydra", "group", "hydra", {}),
    "l1_group": ("omp", "group", "omp", {"filter_norm": "l1"}),
}
DEFAULT_METHODS = ("bip_group", "bip_filter", "bip_filter_unit_bn", "imp_filter", "omp_filter", "hydra_filter", "l1_filter")
LABELS = {"bip_group": "BiP (group masks)", "bip_filter": "BiP (filter masks)",
          "bip_filter_bn": "BiP (filter masks, BatchNorm-corrected scores)",
          "bip_filter_unit_bn": "BiP (filter masks, one BatchNorm-corrected score per filter)", "imp_filter": "IMP-F",
          "omp_filter": "OMP-F", "hydra_filter": "Hydra (filter)", "l1_filter": "L1-norm filter",
          "imp_group": "IMP (group masks)", "omp_group": "OMP (group masks)", "hydra_group": "Hydra (group masks)",
          "l1_group": "L1-norm (group masks)"}
SPARSITIES = (0.2, 0.5, 0.8)
IMP_RATE = 0.2  # IMP-F prunes about this fraction of the remaining filters per round
TUNE_SEED = 0


def label(method: str) -> str:
    return LABELS.get(method, method)


def tune_sparsity(sparsities: Sequence[float]) -> float:
    """The sparsity the grids run at: the one closest to 50%."""
    return min(sparsities, key=lambda s: (abs(s - 0.5), s))


def imp_schedule(sparsities: Sequence[float], rate: float = IMP_RATE) -> List[Tuple[float, Optional[float]]]:
    """IMP-F's rounds as (rate, target reached after the round or None): from each target to the
    next, the whole number of rounds nearest to removing ``rate`` per round, at the one rate that
    lands on the target (20/50/80%: 1 round of 20%, 2 of 20.9%, 4 of 20.5%)."""
    rounds: List[Tuple[float, Optional[float]]] = []
    prev = 0.0
    for t in sorted(sparsities):
        ratio = (1.0 - t) / (1.0 - prev)
        n = max(1, round(math.log(ratio) / math.log(1.0 - rate)))
        r = 1.0 - ratio ** (1.0 / n)
        rounds += [(r, None)] * (n - 1) + [(r, t)]
        prev = t
    return rounds


# --------------------------------------------------------------------------------------------
# hyper-parameters and algorithms
# --------------------------------------------------------------------------------------------
def method_hparams(ctx: Ctx, method: str, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Constructor hyper-parameters: the base settings of the speedup method it is tuned like,
    updated by ``config`` (default: the choice in ``ctx.chosen``), "scaled" score lrs resolved."""
    like = METHODS[method][2]
    return hparams(ctx, like, ctx.chosen.get(method, {}) if config is None else config)


def grid(method: str) -> List[Dict[str, Any]]:
    return GRIDS[METHODS[method][2]]


def classifier_name(model: torch.nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


def example_input(ctx: Ctx) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, *ctx.data.test_x.shape[1:], generator=g)


def make_algorithm(ctx: Ctx, method: str, model: torch.nn.Module, sparsity: float, hp: Dict[str, Any]):
    """``method``'s algorithm on ``model``. Group masks: the model's coupled channels are traced
    first (the classifier's outputs are the model's output and stay whole). Per-layer filter
    masks: the classifier is left dense, as in the authors' structured runs (SPEC §2)."""
    algo, structure, _, extra = METHODS[method]
    st = ctx.steps
    kw: Dict[str, Any] = dict(extra, structure=structure, momentum=0.9)
    hp = {k: v for k, v in hp.items() if k not in kw}  # the method's structure wins over a base setting's
    if structure == "group":
        bip_fast.attach_groups(model, example_input(ctx).to(ctx.device))
    else:
        kw["exclude"] = [classifier_name(model)]
    if algo == "bip":
        return bip_fast.BiP(model, sparsity, total_steps=st["bip"], **kw, **hp)
    if algo == "omp":
        return bip_fast.OMP(model, sparsity, total_steps=st["omp"], **kw, **hp)
    if algo == "hydra":
        return bip_fast.Hydra(model, sparsity, score_weight_decay=hp["weight_decay"], total_steps=st["hydra_score"],
                              finetune_steps=st["hydra_finetune"], **kw, **hp)
    if algo == "imp":
        return bip_fast.IMP(model, rate=IMP_RATE, rewind_step=0, total_steps=st["imp_round"], **kw, **hp)
    raise ValueError(f"method: unknown method {method!r}")


def segments(ctx: Ctx, method: str) -> List[Segment]:
    algo, st = METHODS[method][0], ctx.steps
    if algo == "bip":
        return [Segment("bip", st["bip"])]
    if algo == "omp":
        return [Segment("retrain", st["omp"])]
    return [Segment("hydra_score", st["hydra_score"]),
            Segment("hydra_finetune", st["hydra_finetune"], enter=lambda a, s: a.finetune())]


# --------------------------------------------------------------------------------------------
# inference cost
# --------------------------------------------------------------------------------------------
def filter_sparsity(model: torch.nn.Module) -> float:
    """Fraction of the filters (output channels) of the masked layers, the classifier excepted,
    that keep no weight."""
    cls = classifier_name(model)
    kept = total = 0
    for name, mod in masked_modules(model):
        if name == cls:
            continue
        units = kept_units(mod.mask, getattr(mod, "out_dim", 0))
        kept += int(units.sum())
        total += units.numel()
    return 1.0 - kept / max(total, 1)


def _nonzero_params(model: torch.nn.Module) -> int:
    """Parameters left nonzero once every mask is baked in (:func:`bip_fast.finalize`: weight, bias
    and BatchNorm channel masks), scores not counted: a removed channel's bias and BatchNorm entries
    do not count, a zero filter's unmasked BatchNorm shift (it still flows) does."""
    plain = bip_fast.finalize(copy.deepcopy(model))
    return sum(int(torch.count_nonzero(p)) for p in plain.parameters())


# the parts of a run's schedule over which the mask's movement is recorded (tenths of training)
FLIP_PARTS = 10


def _flips(state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The run's mask movement per tenth of its training (``execute(track_masks=...)``)."""
    t = state.get("mask_flips")
    return None if t is None else {"steps": t["steps"][:len(t["filters"])], "filters": t["filters"],
                                   "entries": t["entries"]}


def _rounds(ctx: Ctx) -> int:
    return ctx.latency.get("rounds") or (2 if ctx.latency["min_run_time"] < 0.1 else 10)


def latencies(models: Dict[str, torch.nn.Module], example: torch.Tensor, ctx: Ctx) -> Dict[str, Dict[str, Any]]:
    """{kind: {batch: median ms}} of ``models`` on the CPU, timed interleaved in one session per
    batch (benchmarks/compact.py's protocol: ``C.interleaved``, rounds of one chunk per kind in a
    shuffled order, the first round discarded, median over chunks; ``threads`` threads,
    inference_mode, eval mode); the first model is the one a chunk's length is sized on (the dense
    model gets about ``min_run_time`` seconds of timed calls per session). Also
    ``{"control_rel_diff": {batch: ...}}`` when ``"dense"`` and ``"dense (copy)"`` are both timed."""
    lt = ctx.latency
    rounds = _rounds(ctx)
    out: Dict[str, Dict[str, Any]] = {k: {} for k in models}
    base = next(iter(models))
    for b in lt["batches"]:
        x = torch.randn(b, *example.shape[1:], generator=torch.Generator().manual_seed(b))
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        tm, _ = timed_session(fns, base, rounds, lt["min_run_time"] / rounds, threads=lt["threads"])
        for k in models:
            out[k][str(b)] = tm[k].median_ms
    if "dense" in models and "dense (copy)" in models:
        out["control_rel_diff"] = {b: abs(v - out["dense (copy)"][b]) / min(v, out["dense (copy)"][b])
                                   for b, v in out["dense"].items()}
    return out


def dense_cost(ctx: Ctx) -> Dict[str, Any]:
    """The plain dense architecture: MACs, parameters and CPU latency (timed with a copy of itself,
    the control)."""
    dense = _build(ctx.cfg["arch"]).eval()
    ex = example_input(ctx)
    lat = latencies({"dense": dense, "dense (copy)": copy.deepcopy(dense)}, ex, ctx)
    return {"macs": count_macs(dense, ex[:1]), "params": sum(p.numel() for p in dense.parameters()),
            "latency_ms": lat["dense"], "control_rel_diff": lat["control_rel_diff"]}


def inference_cost(ctx: Ctx, model: torch.nn.Module, structure: str) -> Dict[str, Any]:
    """What the pruned ``model`` costs at inference on the CPU as a user would ship it: compacted
    (:func:`bip_fast.compact`, which checks masked == compacted). Group masks lose every zeroed
    channel; per-layer filter masks lose the zero filters their coupled groups let go (the ReLU maps
    the filter's BatchNorm constant to 0 and no other layer still produces the channel) and keep the
    rest as zeros (``filters_cut`` / ``filters_left_zero``). The compacted, the masked and the
    plain dense model (and a copy of it, the control) are timed interleaved right after the run, so
    the ratios to dense do not drift with the machine."""
    ex = example_input(ctx)
    masked = copy.deepcopy(model).cpu().eval()
    run, rep = bip_fast.compact(masked, ex, return_report=True)
    run.eval()
    dense = _build(ctx.cfg["arch"]).eval()
    out: Dict[str, Any] = {"structure": structure, "compacted": True, "removable": rep.filters_zero == 0,
                           "filter_sparsity": filter_sparsity(masked), "nonzero_params": _nonzero_params(masked),
                           "params": sum(p.numel() for p in run.parameters()), "macs": count_macs(run, ex[:1]),
                           "filters_cut": rep.filters_removed, "filters_left_zero": rep.filters_zero,
                           "channels_cut": rep.channels_removed, "channels_left_zero": rep.channels_zero,
                           "kept_because": rep.kept_because}
    lat = latencies({"dense": dense, "dense (copy)": copy.deepcopy(dense), "masked": masked, "compacted": run}, ex, ctx)
    out["dense_latency_ms"] = lat["dense"]
    out["masked_latency_ms"] = lat["masked"]
    out["latency_ms"] = lat["compacted"]
    out["control_rel_diff"] = lat["control_rel_diff"]
    out["latency_ratio"] = {b: out["latency_ms"][b] / lat["dense"][b] for b in out["latency_ms"]}
    out["macs_ratio"] = out["macs"] / count_macs(dense, ex[:1])
    out["params_ratio"] = out["params"] / sum(p.numel() for p in dense.parameters())
    return out


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
def run_one_shot(ctx: Ctx, method: str, sparsity: float, seed: int, pre: Dict[str, Any],
                 hp: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """BiP, OMP, Hydra or L1-norm pruning of the dense run of ``seed`` to ``sparsity`` filters.
    Entries of ``hp`` whose names start with ``x_`` (an experiment's setting the caller applies)
    are part of the run's id and not passed to the constructor."""
    hp = method_hparams(ctx, method) if hp is None else hp
    run_id = f"{method}-s{round(100 * sparsity)}-seed{seed}-{config_tag(hp)}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    bilevel = METHODS[method][0] == "bip"

    def make():
        return make_algorithm(ctx, method, _model_from(ctx, pre["final"]), sparsity,
                              {k: v for k, v in hp.items() if not k.startswith("x_")})

    _warmup(ctx, method, make, bilevel)
    alg = make()
    segs = segments(ctx, method)
    total = sum(s.steps for s in segs)
    C.log(f"[structured] {run_id}: {total} steps")
    state = execute(ctx, run_id, alg, segs, seed, bilevel, eval_at=[total], track_masks=FLIP_PARTS)
    last = state["curve"][-1]
    result = {"method": method, "seed": seed, "target_sparsity": sparsity, "weight_sparsity": alg.sparsity(),
              "test_acc": last["test_acc"], "val_acc": last.get("val_acc"), "train_seconds": state["train_seconds"],
              "steps": total, "curve": state["curve"], "hparams": hp,
              "inference": inference_cost(ctx, alg.model, METHODS[method][1]),
              "mask_flips": _flips(state)}
    C.log(f"[structured] {run_id}: filters {result['inference']['filter_sparsity']:.3f} "
          f"acc {result['test_acc']:.4f} {result['train_seconds']:.1f}s")
    _save_result(ctx, run_id, result)
    return result


def run_imp(ctx: Ctx, method: str, seed: int, pre: Dict[str, Any], hp: Optional[Dict[str, Any]] = None,
            until: Optional[float] = None) -> Dict[str, Any]:
    """IMP-F from the dense run of ``seed``: prunes the trained weights, rewinds to the early ones
    (step round(3/160·D) of the dense run), retrains D steps per round through
    :func:`imp_schedule`; a record at every target. ``until``: stop after the round that
    reaches that target, keeping the checkpoint (tuning); the chosen configuration continues."""
    hp = method_hparams(ctx, method) if hp is None else hp
    run_id = f"{method}-seed{seed}-{config_tag(hp)}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    plan = imp_schedule(ctx.sparsities)
    structure = METHODS[method][1]

    def make():
        alg = make_algorithm(ctx, method, _model_from(ctx, pre["rewind"]), 0.0, hp)
        with torch.no_grad():
            _load_plain(alg.model, pre["final"])
        return alg

    def make_warm():
        a = make()
        a.next_round(plan[0][0])
        return a

    def record(target):
        def end(a, state):
            rec = {"round": a.round, "target_sparsity": target, "weight_sparsity": a.sparsity(),
                   **evaluate(a.model, ctx), "cum_train_seconds": state["train_seconds"], "cum_steps": state["step"],
                   "inference": inference_cost(ctx, a.model, structure)}
            state["records"].append(rec)
            C.log(f"[structured] {run_id} round {a.round}: filters {rec['inference']['filter_sparsity']:.3f} "
                  f"acc {rec['test_acc']:.4f} cum {rec['cum_train_seconds']:.1f}s")
        return end

    _warmup(ctx, method, make_warm, False)
    alg = make()
    segs = [Segment(f"round{i + 1}", ctx.steps["imp_round"], enter=lambda a, s, r=r: a.next_round(r),
                    end=None if t is None else record(t)) for i, (r, t) in enumerate(plan)]
    stop = None if until is None else 1 + next(i for i, (_, t) in enumerate(plan) if t == until)
    state = execute(ctx, run_id, alg, segs, seed, False, until=stop, track_masks=FLIP_PARTS)
    result = {"method": method, "seed": seed, "records": state["records"], "train_seconds": state["train_seconds"],
              "hparams": hp, "rounds": [{"rate": r, "target": t} for r, t in plan],
              "steps_per_round": ctx.steps["imp_round"], "mask_flips": _flips(state)}
    if len(state["records"]) == len(ctx.sparsities):
        _save_result(ctx, run_id, result)
    return result


def run_method(ctx: Ctx, method: str, seed: int, pre: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One record per target sparsity: {method, seed, target_sparsity, test_acc, val_acc, inference, ...}."""
    if METHODS[method][0] == "imp":
        res = run_imp(ctx, method, seed, pre)
        return [dict(rec, method=method, seed=seed, train_seconds=rec["cum_train_seconds"], hparams=res["hparams"],
                     code=res.get("code", ctx.code), mask_flips=res.get("mask_flips")) for rec in res["records"]]
    return [run_one_shot(ctx, method, s, seed, pre) for s in ctx.sparsities]


# --------------------------------------------------------------------------------------------
# tuning
# --------------------------------------------------------------------------------------------
def tune(ctx: Ctx, methods: Sequence[str], pre: Dict[str, Any], source: str,
         tuned_from: Optional[str] = None) -> Dict[str, Any]:
    """Set ``ctx.chosen`` for every method and say where each choice comes from.

    ``"grid"``: every configuration of the method's grid (the grid and the rule of
    benchmarks/speedup.py: 4 configurations each) runs at the sparsity nearest 50% from the dense
    model of seed TUNE_SEED; the highest final validation accuracy wins (ties: the earlier).
    ``"speedup"``: the configurations that benchmarks/speedup.py chose (unstructured pruning, its
    rule) from the JSON ``tuned_from``. ``"none"``: the base settings."""
    out: Dict[str, Any] = {}
    if source == "speedup":
        with open(tuned_from) as f:
            chosen = json.load(f).get("tuning")
        if not chosen:
            raise ValueError(f"--tune speedup: {tuned_from} holds no 'tuning' (made before tuning existed?)")
    target = tune_sparsity(ctx.sparsities)
    for m in methods:
        like = METHODS[m][2]
        if source == "none":
            ctx.chosen[m] = {}
            out[m] = {"source": "base settings, not tuned", "chosen": method_hparams(ctx, m)}
        elif source == "speedup":
            ctx.chosen[m] = dict(chosen.get(like, {}).get("chosen") or {})
            out[m] = {"source": f"benchmarks/speedup.py's choice for {like} ({tuned_from})",
                      "chosen": ctx.chosen[m], "chosen_hparams": method_hparams(ctx, m)}
        else:
            tried = []
            for cfg in grid(m):
                hp = method_hparams(ctx, m, cfg)
                if METHODS[m][0] == "imp":
                    got = next(r for r in run_imp(ctx, m, TUNE_SEED, pre, hp, until=target)["records"]
                               if r["target_sparsity"] == target)
                else:
                    got = run_one_shot(ctx, m, target, TUNE_SEED, pre, hp)
                tried.append({"config": cfg, "hparams": hp, "val_acc": got["val_acc"], "test_acc": got["test_acc"]})
                C.log(f"[structured] tuning {m} {cfg}: val {got['val_acc']:.4f}")
            best = max(range(len(tried)), key=lambda i: (tried[i]["val_acc"], -i))
            ctx.chosen[m] = dict(grid(m)[best])
            out[m] = {"source": "grid", "configs": tried, "chosen": ctx.chosen[m],
                      "chosen_hparams": tried[best]["hparams"], "target_sparsity": target, "seed": TUNE_SEED,
                      "rule": f"highest final validation accuracy at {100 * target:.0f}% filter sparsity, seed "
                              f"{TUNE_SEED} (ties: the earlier configuration); the choice serves every target and seed"}
    return out

