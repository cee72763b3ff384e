"""Why does BiP (paper hyper-parameters) stay at the dense start's accuracy? An ablation.

Runs BiP at one target sparsity of a speedup preset (default: ``--preset cpu``, 86.6% sparsity,
the hardest target) from the same cached dense model as ``benchmarks/speedup.py``, changing one
thing at a time: the weight learning rate, the score learning rate (and the rule that keeps the
paper's product of score learning rate and steps), the score initialisation, the implicit-gradient
term (gamma), the schedule (alternating / fused / official) and the schedule length. Each row
reports the final test accuracy (full test set), the accuracy curve, the training seconds and how
much of the final mask was not in the initial (magnitude) mask.

    python benchmarks/bip_ablation.py --preset cpu --round 9 --seeds 1 --max-minutes 30 --resume

Resumable like speedup.py (finished rows in <out>/runs/, unfinished ones checkpointed per epoch).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

try:
    from . import _common as C
    from . import _speedup_loop as L
    from . import _speedup_presets as P
    from . import _speedup_report as R
    from . import _speedup_tables as T
    from . import _speedup_runs as S
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    import _speedup_loop as L  # type: ignore[no-redef]
    import _speedup_presets as P  # type: ignore[no-redef]
    import _speedup_report as R  # type: ignore[no-redef]
    import _speedup_tables as T  # type: ignore[no-redef]
    import _speedup_runs as S  # type: ignore[no-redef]

PAPER = P.PAPER_HPARAMS


def configs(bip_steps: int) -> Dict[str, Dict[str, Any]]:
    """name -> {"method", "overrides", "length"}: one change at a time from the paper's settings."""
    product = S.scaled_score_lr(bip_steps, base=PAPER["score_lr"])  # score lr x steps as in the paper

    def paper(**kw):
        return {"method": "bip_paper", "overrides": kw, "length": 1.0}

    out = {
        "paper (lr 0.01, score lr 0.1)": paper(),
        "paper, IG off (gamma=inf)": paper(gamma=math.inf),
        "paper, hydra score init": paper(score_init="hydra"),
        "paper, score lr x steps kept": paper(score_lr=product),
        "lr 0.1": paper(lr=0.1),
        "lr 0.1, scores frozen": paper(lr=0.1, score_lr=0.0),
        "lr 0.1, score lr x steps kept": paper(lr=0.1, score_lr=product),
        "lr 0.1, score lr x steps kept, IG off": paper(lr=0.1, score_lr=product, gamma=math.inf),
        "lr 0.1, score lr x steps kept, fused": paper(lr=0.1, score_lr=product, schedule="fused"),
        "lr 0.1, score lr 1.0": paper(lr=0.1, score_lr=1.0),
        "lr 0.1, score lr x steps kept, 2x schedule": dict(paper(lr=0.1), length=2.0),
        "official variant": {"method": "bip_official", "overrides": {}, "length": 1.0},
    }
    out["lr 0.1, score lr x steps kept, 2x schedule"]["overrides"]["score_lr"] = product / 2.0
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(P.PRESETS), default="cpu")
    p.add_argument("--round", type=int, default=9, help="target: 0.8^round density (9: 86.6%% sparsity)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated substrings: run only matching configs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="with --resume: reuse rows and cached dense models made by another commit")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--report-only", action="store_true", help="train nothing: tabulate the finished rows")
    args = p.parse_args(argv)
    if args.report_only:
        args.resume = True
    device = S._device(args.device)
    args.out = args.out or os.path.join(C.RESULTS_DIR, f"bip-ablation-{C.device_slug(device)}-{args.preset}")
    ctx, cfg, data_dir = S.setup(args, args.preset, device)
    if ctx is None:
        return 2
    st = ctx.steps
    cfgs = configs(st["bip"])
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        cfgs = {n: c for n, c in cfgs.items() if any(k in n for k in keys)}
    env = C.environment(device)
    print(C.format_header(env, f"BiP ablation (preset {args.preset}, {100 * (1 - 0.8 ** args.round):.1f}% sparsity)"))
    t0 = time.monotonic()
    rows, stopped = [], None
    with L.stop_on_signals(ctx):
        try:
            for seed in range(args.seeds):
                pre = S.pretrain(ctx, seed)  # cached by speedup.py / earlier rows
                for i, (name, c) in enumerate(cfgs.items()):
                    run_id = f"cfg{i:02d}-seed{seed}"
                    if args.report_only:
                        res = L._load_result(ctx, run_id)
                        if res is None:
                            continue
                    else:
                        steps = max(1, round(c["length"] * st["bip"]))
                        hp = dict(S.hparams(ctx, c["method"]), **c["overrides"], total_steps=steps)
                        res = S.run_one_shot(ctx, c["method"], args.round, seed, pre, hp=hp, run_id=run_id,
                                             segments=[L.Segment("bip", steps)])
                    rows.append(dict(res, config=name, overrides=c["overrides"], dense_acc=pre["test_acc"]))
        except L.Stop as s:
            stopped = str(s)
        except L.MixedCode as e:
            print(f"--resume: {e}", file=sys.stderr)
            return 2
    table = ["| config | seeds | val acc % | test acc % | dense % | mask entries changed | train s |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for name in cfgs:
        got = [r for r in rows if r["config"] == name]
        if not got:
            continue
        acc, std = R.mean_std([r["test_acc"] for r in got])
        vals = [r.get("val_acc") for r in got]
        val, vstd = R.mean_std(vals) if None not in vals else (None, None)
        ch = statistics.mean(r.get("mask_change", float("nan")) for r in got)
        sec = statistics.mean(r["train_seconds"] for r in got)
        dense = statistics.mean(r["dense_acc"] for r in got)
        summary.append({"config": name, "method": got[0]["method"], "overrides": got[0]["overrides"],
                        "n_seeds": len(got), "val_acc": val, "val_acc_std": vstd, "test_acc": acc, "test_acc_std": std, "dense_acc": dense,
                        "mask_change": ch, "train_seconds": sec, "curves": [r["curve"] for r in got]})
        table.append(f"| {name} | {len(got)} | {T.pct(val, vstd)} | {T.pct(acc, std)} | {100 * dense:.2f} | {100 * ch:.1f}% | {sec:.0f} |")
    print("\n".join(table))
    if stopped:
        print(f"\n{ctx.stop_reason()} in {stopped}; rerun with --resume to continue")
    path = args.json or os.path.join(args.out, "ablation.json")
    C.write_json(path, benchmark="bip_ablation", env=env, rows=[],
                 config=dict(cfg, preset=args.preset, round=args.round, steps=st, device=str(device),
                             paper_bip_steps=P.PAPER_BIP_STEPS),
                 extra={"results": summary, "table": "\n".join(table),
                        "complete": stopped is None and len(summary) == len(cfgs),
                        "continue_command": f"python benchmarks/bip_ablation.py --preset {args.preset} "
                                            f"--round {args.round} --seeds {args.seeds} --resume",
                        "wall_seconds": time.monotonic() - t0})
    print(f"wrote {path}")
    return ctx.exit_status()


if __name__ == "__main__":
    sys.exit(main())
