"""The runs of ``benchmarks/speedup.py``: dense pretraining (cached by config hash; also the longer
run of the convergence check), IMP and every one-shot method on the loop of ``_speedup_loop``, and
the set-up of a run's output folder, data and context."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

import torch

try:  # imported as part of a package (python -m benchmarks.speedup)
    from . import _common as C
    from ._speedup_loop import (Ctx, Segment, _build, _load_result, _save_result, _warmup, eval_points,
                                evaluate, execute)
    from ._speedup_presets import (AT_INIT, BASE_HPARAMS, BIP_CONFIGS, IMP_RATE, PAPER_HYDRA_SCORE_STEPS, PRESETS,
                                   SCORE_SAMPLES, TARGET_ROUNDS)
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _speedup_loop import (  # type: ignore[no-redef]
        Ctx, Segment, _build, _load_result, _save_result, _warmup, eval_points, evaluate, execute)
    from _speedup_presets import (  # type: ignore[no-redef]
        AT_INIT, BASE_HPARAMS, BIP_CONFIGS, IMP_RATE, PAPER_HYDRA_SCORE_STEPS, PRESETS, SCORE_SAMPLES, TARGET_ROUNDS)

import bip_fast
from bip_fast.data import eval_loader, load_dataset, subset_indices
from bip_fast.files import checkpoint as ckpt
from bip_fast.pruning import get_algorithm
from bip_fast.pruning.bip import scaled_score_lr


# --------------------------------------------------------------------------------------------
# dense pretraining (cached by config hash)
# --------------------------------------------------------------------------------------------
def pretrain_key(ctx: Ctx, seed: int, factor: float = 1.0) -> Dict[str, Any]:
    c = ctx.cfg
    key = {"arch": c["arch"], "train_subset": c["train_subset"], "test_subset": c["test_subset"],
           "dense_steps": round(factor * ctx.D), "batch_size": c["batch_size"], "lr": 0.1, "weight_decay": 5e-4,
           "momentum": 0.9, "rewind_step": ctx.steps["rewind"], "seed": seed, "device": ctx.device.type,
           "data_seed": 0, "format": 2}
    for k in ("eval_points", "augment", "val"):
        if k in c:
            key[k] = c[k]
    return key


def pretrain(ctx: Ctx, seed: int, factor: float = 1.0) -> Dict[str, Any]:
    """Dense training for ``factor`` x D steps (cosine over all of them), cached by config hash.

    Returns {"final", "rewind", "test_acc", "train_seconds", "curve", "steps", ...}; the curve
    holds test accuracies at ``eval_points`` even fractions of the schedule."""
    key = pretrain_key(ctx, seed, factor)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(ctx.args.cache_dir, exist_ok=True)
    path = os.path.join(ctx.args.cache_dir, f"pretrained-{h}.pt")
    what = "dense pretraining" if factor == 1.0 else f"dense training x{factor:g} (convergence check)"
    if os.path.exists(path):
        obj = ckpt.load(path, map_location=ctx.device)
        if getattr(ctx.args, "allow_mixed_commits", False) or obj.get("code") == ctx.code:
            C.log(f"[speedup] {what} seed {seed}: cached {path}")
            return obj
        C.log(f"[speedup] {what} seed {seed}: cached {path} was made by code {obj.get('code')}, retraining")
    steps = key["dense_steps"]
    torch.manual_seed(seed)
    alg = dense_algorithm(ctx, _build(ctx.cfg["arch"]).to(ctx.device), steps)
    _warmup(ctx, "dense", lambda: dense_algorithm(ctx, _build(ctx.cfg["arch"]).to(ctx.device), steps), False)
    run_id = f"pretrain-{h}"

    def snap(a, state):
        state["extra"]["rewind"] = _plain_state(a.model)

    segs = [Segment("dense_to_rewind", ctx.steps["rewind"], end=snap),
            Segment("dense", steps - ctx.steps["rewind"])]
    C.log(f"[speedup] {what} seed {seed}: {steps} steps")
    state = execute(ctx, run_id, alg, segs, seed, False, eval_at=eval_points(steps, ctx.cfg.get("eval_points")))
    obj = {"key": key, "seed": seed, "factor": factor, "steps": steps,
           "final": _plain_state(alg.model),
           "rewind": state["extra"]["rewind"], "test_acc": state["curve"][-1]["test_acc"],
           "val_acc": state["curve"][-1].get("val_acc"), "curve": state["curve"],
           "train_seconds": state["train_seconds"], "code": ctx.code, "final_sha256": state_digest(alg.model)}
    C.log(f"[speedup] {what} seed {seed}: acc {obj['test_acc']:.4f} {obj['train_seconds']:.1f}s")
    ckpt.save_atomic(obj, path)
    return obj


def dense_record(seed: int, pre: Dict[str, Any], *extra: str) -> Dict[str, Any]:
    """The row a dense run (``pretrain``'s result) adds to a benchmark's results: its seed,
    accuracies, time, steps and code version, and the ``extra`` keys asked for."""
    return {"seed": seed, **{k: pre.get(k) for k in ("test_acc", "val_acc", "train_seconds", "steps", "code", *extra)}}


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's plain state (names and bytes, in order): a dense model retrained from
    scratch (a cache lost between sessions) can be checked against the one earlier runs started from."""
    h = hashlib.sha256()
    for k, v in _plain_state(model).items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dense_algorithm(ctx: Ctx, model: torch.nn.Module, steps: int):
    """Dense SGD (lr 0.1, wd 5e-4, cosine over ``steps``) through masked layers whose masks keep
    everything: the very step of an IMP round or OMP's retraining (the same mask multiply and
    masked gradient), so that the dense run, IMP and OMP do the same work per step. With every
    mask True the arithmetic is that of the plain layers."""
    return bip_fast.Dense(bip_fast.sparsify(model), lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=steps)


def _plain_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state without masks and scores (loads into the plain architecture)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not (k.endswith(".mask") or k.endswith(".scores"))}


def _model_from(ctx: Ctx, sd: Dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _build(ctx.cfg["arch"]).to(ctx.device)
    model.load_state_dict(sd)
    return model


def _load_plain(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not (k.endswith("mask") or k.endswith("scores"))]
    if bad or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {bad}, unexpected {unexpected}")


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
def config_tag(hp: Dict[str, Any]) -> str:
    """Short stable name of a configuration (part of a run's id)."""
    return hashlib.sha256(json.dumps(hp, sort_keys=True, default=str).encode()).hexdigest()[:8]


def hparams(ctx: Ctx, method: str, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The resolved constructor hyper-parameters of ``method``: its base settings, then the tuned
    choice (``ctx.chosen``) or an explicit ``config`` (a point of its grid), with "scaled" score
    learning rates resolved to numbers."""
    st = ctx.steps
    hp = dict(BIP_CONFIGS[method]) if method in BIP_CONFIGS else dict(BASE_HPARAMS.get(method, {}))
    hp.update(ctx.chosen.get(method, {}) if config is None else config)
    if method in BIP_CONFIGS and hp.get("score_lr") in (None, "scaled"):
        hp["score_lr"] = scaled_score_lr(st["bip"])
    if method == "hydra" and hp.get("score_lr") == "scaled":
        hp["score_lr"] = 0.1 * PAPER_HYDRA_SCORE_STEPS / st["hydra_score"]
    return hp


def run_imp(ctx: Ctx, seed: int, pre: Dict[str, Any], hp: Optional[Dict[str, Any]] = None,
            until_round: Optional[int] = None) -> Dict[str, Any]:
    """IMP's rounds 1..9 from the dense run of ``seed`` (pruned from its final weights, rewound
    to its early ones). ``until_round``: stop after that round, keeping the checkpoint (tuning);
    returns {"records", ...} of the rounds done so far."""
    hp = hp or hparams(ctx, "imp")
    run_id = f"imp-seed{seed}-{config_tag(hp)}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    rounds = max(target_rounds(ctx))
    D = ctx.steps["imp_round"]

    def make():
        alg = bip_fast.IMP(_model_from(ctx, pre["rewind"]), rate=IMP_RATE, rewind_step=0, momentum=0.9,
                           total_steps=D, **hp)
        with torch.no_grad():
            _load_plain(alg.model, pre["final"])  # prune from the trained weights, rewind to the early ones
        return alg

    def make_warm():
        a = make()
        a.next_round()
        return a

    _warmup(ctx, "imp", make_warm, False)
    alg = make()

    def enter(a, state):
        a.next_round()

    def end(a, state):
        state["records"].append({"round": a.round, "sparsity": a.sparsity(), **evaluate(a.model, ctx),
                                 "cum_train_seconds": state["train_seconds"], "cum_steps": state["step"]})
        r = state["records"][-1]
        C.log(f"[speedup] IMP seed {seed} round {r['round']}: sparsity {r['sparsity']:.4f} acc {r['test_acc']:.4f} "
              f"cum {r['cum_train_seconds']:.1f}s")

    segs = [Segment(f"round{r}", D, enter=enter, end=end) for r in range(1, rounds + 1)]
    state = execute(ctx, run_id, alg, segs, seed, False, until=until_round)
    result = {"method": "imp", "seed": seed, "records": state["records"], "train_seconds": state["train_seconds"],
              "hparams": hp, "steps_per_round": D, "code": ctx.code, "dense_sha256": pre.get("final_sha256")}
    if len(state["records"]) == rounds:
        _save_result(ctx, run_id, result)
    return result


def target_rounds(ctx: Ctx) -> List[int]:
    """The IMP rounds whose sparsities are this preset's targets (default TARGET_ROUNDS)."""
    return list(ctx.cfg.get("target_rounds", TARGET_ROUNDS))


def make_algorithm(ctx: Ctx, method: str, model: torch.nn.Module, sparsity: float,
                   hp: Optional[Dict[str, Any]] = None):
    """The algorithm object of a one-shot ``method`` at ``sparsity`` with this preset's schedule
    and the hyper-parameters ``hp`` (default: ``hparams(ctx, method)``)."""
    st = ctx.steps
    hp = hparams(ctx, method) if hp is None else hp
    if method in BIP_CONFIGS:
        return bip_fast.BiP(model, sparsity, **dict({"momentum": 0.9, "total_steps": st["bip"]}, **hp))
    if method == "omp":
        return bip_fast.OMP(model, sparsity, momentum=0.9, total_steps=st["omp"], **hp)
    if method == "hydra":
        return bip_fast.Hydra(model, sparsity, momentum=0.9, score_weight_decay=hp["weight_decay"],
                              total_steps=st["hydra_score"], finetune_steps=st["hydra_finetune"], **hp)
    if method == "gmp":
        # cubic ramp over the first half of the schedule, ~10 pruning events, then finetuning
        return bip_fast.GMP(model, sparsity, prune_every=max(1, st["omp"] // 20), momentum=0.9,
                            total_steps=st["omp"], **hp)
    if method in AT_INIT:
        return get_algorithm(method)(model, sparsity, momentum=0.9, total_steps=st["omp"], **hp)
    raise ValueError(f"method: unknown method {method!r}")


def score_batch(ctx: Ctx, method: str, seed: int):
    """The batch an at-initialisation method scores on, drawn per seed: SNIP one random training
    batch, GraSP a class-balanced batch (10 images per class), SynFlow one image (its shape)."""
    n = SCORE_SAMPLES[method]
    if method == "grasp":
        d = ctx.data
        idx = subset_indices(d.train_y, n, d.num_classes, seed=100 + seed)
        return next(iter(eval_loader(d.train_x[idx], d.train_y[idx], n, mean=d.mean, std=d.std)))
    return next(iter(ctx.data.train_loader(n, seed=100 + seed, augment=False)))


def method_segments(ctx: Ctx, method: str, seed: int) -> List[Segment]:
    st = ctx.steps
    if method.startswith("bip"):
        return [Segment("bip", st["bip"])]
    if method == "omp":
        return [Segment("omp", st["omp"])]
    if method == "hydra":
        return [Segment("hydra_score", st["hydra_score"]),
                Segment("hydra_finetune", st["hydra_finetune"], enter=lambda a, s: a.finetune())]
    if method == "gmp":
        return [Segment("gmp", st["omp"])]
    if method in AT_INIT:
        def cut(alg, state):  # the scores and the cut count as training time
            batch = score_batch(ctx, method, seed)
            C.synchronize(ctx.device)
            t0 = time.perf_counter()
            alg.prepare([batch])
            C.synchronize(ctx.device)
            state["train_seconds"] += time.perf_counter() - t0
        return [Segment("train", st["omp"], enter=cut)]
    raise ValueError(f"method: unknown method {method!r}")


def run_one_shot(ctx: Ctx, method: str, target_round: int, seed: int, pre: Dict[str, Any],
                 hp: Optional[Dict[str, Any]] = None, run_id: Optional[str] = None,
                 segments: Optional[List[Segment]] = None) -> Dict[str, Any]:
    """``method`` at the target sparsity of IMP's round ``target_round`` from the dense run of
    ``seed``, with the hyper-parameters ``hp`` (default: the method's, tuned where it was)."""
    sparsity = 1.0 - (1.0 - IMP_RATE) ** target_round
    hp = hparams(ctx, method) if hp is None else hp
    run_id = run_id or f"{method}-r{target_round}-seed{seed}-{config_tag(hp)}"
    done = _load_result(ctx, run_id)
    if done is not None:
        return done
    bilevel = method.startswith("bip")

    def make():
        if method in AT_INIT:
            torch.manual_seed(seed)  # the dense run's initialisation (pretrain seeds the same way)
            model = _build(ctx.cfg["arch"]).to(ctx.device)
        else:
            model = _model_from(ctx, pre["final"])
        return make_algorithm(ctx, method, model, sparsity, hp)

    def make_warm():
        a = make()
        if method in AT_INIT:
            a.prepare([score_batch(ctx, method, seed)])
        return a

    _warmup(ctx, method, make_warm, bilevel)
    alg = make()
    segs = segments or method_segments(ctx, method, seed)
    total = sum(s.steps for s in segs)
    C.log(f"[speedup] {run_id} sparsity {sparsity:.4f}: {total} steps")
    extra = {"initial_masks": [m.detach().clone() for m in alg.masks()]}
    state = execute(ctx, run_id, alg, segs, seed, bilevel, extra=extra,
                    eval_at=eval_points(total, ctx.cfg.get("eval_points")))
    last = state["curve"][-1]
    result = {"method": method, "seed": seed, "target_round": target_round, "target_sparsity": sparsity,
              "sparsity": alg.sparsity(), "test_acc": last["test_acc"], "val_acc": last.get("val_acc"),
              "train_seconds": state["train_seconds"], "steps": total, "curve": state["curve"], "hparams": hp,
              "dense_sha256": pre.get("final_sha256")}
    if "initial_masks" in state["extra"]:
        result["mask_change"] = mask_change(state["extra"]["initial_masks"], alg.masks())
    C.log(f"[speedup] {run_id}: sparsity {result['sparsity']:.4f} "
          f"acc {result['test_acc']:.4f} {result['train_seconds']:.1f}s")
    _save_result(ctx, run_id, result)
    return result


def mask_change(before: List[torch.Tensor], after: List[torch.Tensor]) -> float:
    """Fraction of the kept entries of ``after`` that were not kept in ``before``."""
    kept = sum(int(a.sum()) for a in after)
    new = sum(int(((a > 0) & (b == 0)).sum()) for a, b in zip(after, before))
    return new / max(kept, 1)


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def run_arguments(p, out: str, seeds: int = 3) -> None:
    """The arguments every resumable study on the cpu regime shares (device, data, output folder,
    dense cache, --resume / --max-minutes / --allow-mixed-commits, seeds)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (else $BIP_FAST_DATA)")
    p.add_argument("--out", default=out)
    p.add_argument("--cache-dir", default=None, help="dense pretraining cache (default benchmarks/results/cache)")
    p.add_argument("--resume", action="store_true", help="keep finished runs and continue unfinished ones")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly at the next epoch boundary after "
                                                                    "this budget (rerun with --resume)")
    p.add_argument("--allow-mixed-commits", action="store_true", help="with --resume: reuse runs of another commit")
    p.add_argument("--seeds", type=int, default=seeds)
    p.add_argument("--quick", action="store_true", help="smoke run: 256 training images, 1 seed, 1 dense epoch")


def study_config(args, **over) -> Dict[str, Any]:
    """The cpu preset as a study built on ``run_arguments`` runs it: no convergence check, the seeds
    asked for, the overrides ``over``; ``--quick`` shrinks it to a smoke run (256 training images, one
    seed, one dense epoch of batch 64)."""
    cfg = dict(PRESETS["cpu"], check_convergence=False, seeds=args.seeds, **over)
    if args.quick:
        cfg.update(train_subset=256, test_subset=200, val=100, dense_epochs=1, batch_size=64, seeds=1, eval_points=None)
    return cfg


def setup(args, cfg, device: torch.device):
    """Output folder, data and context of a run of ``cfg`` (a preset name or dict); (None, ...) on
    bad input (the reason is printed). Without ``args.resume`` the folder's runs are cleared;
    with it, the folder must hold runs of the very same configuration."""
    cfg = dict(PRESETS[cfg]) if isinstance(cfg, str) else cfg
    args.cache_dir = args.cache_dir or os.path.join(C.RESULTS_DIR, "cache")
    data_dir = args.data_dir or os.environ.get("BIP_FAST_DATA")
    subset = None if cfg["train_subset"] is None and cfg["test_subset"] is None else (cfg["train_subset"],
                                                                                    cfg["test_subset"])
    try:
        data = load_dataset("cifar10", data_dir=data_dir, device=device, subset=subset, seed=0, val=cfg.get("val", 0))
    except FileNotFoundError as e:
        print(f"CIFAR-10 not found and not downloadable: {e}\nPoint --data-dir (or the BIP_FAST_DATA environment "
              f"variable) at a folder holding cifar-10-batches-py.", file=sys.stderr)
        return None, cfg, data_dir
    cfg["train_samples"], cfg["test_samples"] = int(data.train_x.shape[0]), int(data.test_x.shape[0])
    cfg["val_samples"] = 0 if data.val_x is None else int(data.val_x.shape[0])
    ctx = Ctx(args, cfg, device, data)
    # Finished runs are reused by --resume only under the very same configuration.
    fingerprint = {k: cfg[k] for k in sorted(cfg)}
    fingerprint.update(device=device.type, steps=ctx.steps)
    fp_path = os.path.join(args.out, "config.json")
    if args.resume and os.path.exists(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(fingerprint)):
            print(f"--resume: {args.out} holds runs of another configuration ({old}); use another --out or "
                  f"drop --resume to start over", file=sys.stderr)
            return None, cfg, data_dir
    if not args.resume:
        for sub in ("runs", "ckpt"):
            shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(fp_path, "w") as f:
        json.dump(fingerprint, f, indent=1)
    return ctx, cfg, data_dir
