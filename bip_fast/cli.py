"""Command line: ``python -m bip_fast {pretrain,prune,finetune,eval,export} [flags]``.

Every hyper-parameter of :mod:`bip_fast.engine.hparams` is a flag (``--sparsity 0.9``,
``--arch resnet20``, ``--subset 1024 500`` ...). ``--config FILE.yaml`` reads a config first;
flags given on the command line override it. Examples::

    python -m bip_fast pretrain --arch resnet18 --out runs/dense --data-dir data
    python -m bip_fast prune --config configs/bip_resnet18_cifar10.yaml --pretrained runs/dense --out runs/bip90
    python -m bip_fast prune --out runs/bip90 --resume            # continue an interrupted run
    python -m bip_fast finetune --checkpoint runs/omp90 --epochs 20 --out runs/ft
    python -m bip_fast eval --checkpoint runs/bip90
    python -m bip_fast export --checkpoint runs/bip90 --out runs/bip90/export

A training command (pretrain, prune, finetune) prints its plan as the first line on stdout before
its first step: every segment (dense phase, pruning, finetuning) with its epochs and steps, and
BiP's resolved score lr; its last line is the results as JSON.

Bad input prints one line ``bip_fast: error: ...`` on stderr and exits with status 2; nothing is
written in that case. A run folder that already holds a run is refused unless ``--resume`` (to
continue it) or ``--force`` (to overwrite it). Under torchrun (WORLD_SIZE > 1) the process group
is initialised from the environment and only rank 0 writes files and prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

import torch.distributed as dist

from .engine.evaluation import evaluate_checkpoint, export_checkpoint
from .engine.hparams import COMMANDS, DataHparams, RunConfig, add_flags, load_yaml
from .engine.loop import Trainer
from .engine.rundir import check_out_dir, read_model_file
from .engine.setup import init_distributed_from_env

__all__ = ["main", "build_parser"]

_HELP = {
    "pretrain": "train the dense model (method dense; --epochs defaults to the dataset's dense schedule: "
                "cifar10/cifar100 160, tiny-imagenet 200, imagenet 90); writes model.pt, and rewind.pt (the start "
                "of --rewind-epoch) for IMP",
    "prune": "prune with --method bip|imp|omp|hydra|snip|grasp|synflow|gmp from --pretrained (or after a dense "
             "phase of --pretrain-epochs, by default the dataset's dense schedule: cifar10/cifar100 160 epochs, "
             "tiny-imagenet 200, imagenet 90; SNIP/GraSP/SynFlow prune the initialisation). The first line "
             "printed is the plan: every segment's epochs and steps",
    "finetune": "retrain --checkpoint's model under its fixed masks",
    "eval": "test accuracy and sparsity of --checkpoint",
    "export": "write --checkpoint as a plain PyTorch model (model_dense_format.pt) and masks.pt",
}
# Flags that may differ from the checkpointed config on --resume.
_RESUME_FREE = {"out", "resume", "force", "device", "progress", "config", "command", "nonfinite_skips"}
# Flags eval/export use (the data flags but the training batch size, and these); any other flag
# would be silently ignored there, so it is refused.
_READ_FLAGS = {"config", "command", "checkpoint", "out", "force", "arch", "device", "bf16", "seed", "progress"} | \
    {f.name for f in dataclasses.fields(DataHparams) if f.name != "batch_size"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"bip_fast: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bip_fast",
                     description="BiP pruning and its baselines (IMP, OMP, Hydra, SNIP, GraSP, SynFlow, GMP).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd, help=_HELP[cmd], description=_HELP[cmd])
        run = p.add_argument_group("run")
        run.add_argument("--config", metavar="FILE", help="YAML config (flags override it)")
        run.add_argument("--out", metavar="DIR", default=argparse.SUPPRESS,
                         help="run folder (export: output folder)")
        run.add_argument("--checkpoint", metavar="PATH", default=argparse.SUPPRESS,
                         help="finetune/eval/export: run folder, checkpoint.pt or model.pt")
        run.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                         help="continue the run in --out from its checkpoint.pt")
        run.add_argument("--force", action="store_true", default=argparse.SUPPRESS,
                         help="overwrite a run folder that already holds a run")
        if cmd == "export":
            run.add_argument("--compact", action="store_true",
                             help="also write model_compact.pt2: the removed channels cut out (structure group), "
                                  "saved by torch.export; torch.export.load(path).module() loads it without bip_fast")
        add_flags(p)
    return parser


def _config(args: argparse.Namespace) -> tuple[RunConfig, set]:
    given = {k: v for k, v in vars(args).items() if k not in ("config",)}
    flat = {}
    if args.config:
        flat.update(load_yaml(args.config))
    flat.update(given)
    flat["command"] = args.command
    if args.command in ("pretrain", "finetune", "eval", "export") and "method" not in given:
        if args.command in ("pretrain", "finetune") or "method" not in flat:
            flat["method"] = "dense"
    if args.command == "eval":
        flat.pop("out", None)
    if "subset" in flat and flat["subset"] is not None:
        flat["subset"] = tuple(flat["subset"])
    return RunConfig.from_flat(flat), set(given)


def _check_resume_flags(trainer_cfg: RunConfig, requested: RunConfig, given: set) -> None:
    stored = trainer_cfg.flat()
    want = requested.flat()
    for k in sorted(given - _RESUME_FREE):
        a, b = want.get(k), stored.get(k)
        if isinstance(a, (list, tuple)):
            a = list(a)
        if isinstance(b, (list, tuple)):
            b = list(b)
        if a != b:
            raise ValueError(f"--{k.replace('_', '-')}: the run being resumed has {b!r}, got {a!r} "
                             f"(a resumed run keeps its configuration)")


_TRAINING_OUT: List[Optional[str]] = [None]  # the run folder of the command running, for the Ctrl-C note


def _check_flag_combinations(cmd: str, cfg: RunConfig, given: set) -> None:
    if cfg.resume and cfg.force:
        raise ValueError("--force: cannot be combined with --resume (continue the run, or overwrite it)")
    if cmd in ("eval", "export"):
        unused = sorted(given - _READ_FLAGS)
        if unused:
            flag = "--" + unused[0].replace("_", "-")
            raise ValueError(f"{flag}: {cmd} reads the model, masks and sparsity from --checkpoint and takes no "
                             f"{flag} (it would be ignored)")


def _check_arch_flag(cfg: RunConfig) -> None:
    """eval/export --arch only names the architecture of a file that records none."""
    _, stored = read_model_file(cfg.checkpoint, "checkpoint")
    if stored and str(stored["model"]["arch"]).lower() != cfg.model.arch.lower():
        raise ValueError(f"--arch: '{cfg.checkpoint}' is a {stored['model']['arch']} model, got --arch "
                         f"{cfg.model.arch} (drop --arch: the checkpoint records its architecture)")


def _run(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    compact = bool(vars(args).pop("compact", False))  # export's own flag, not a run setting
    cfg, given = _config(args)
    cmd = cfg.command
    _TRAINING_OUT[0] = cfg.out if cmd in ("pretrain", "prune", "finetune") else None
    _check_flag_combinations(cmd, cfg, given)

    if cmd in ("pretrain", "prune", "finetune"):
        dist_started = init_distributed_from_env()
        if not cfg.out:
            raise ValueError(f"out: {cmd} needs --out DIR")
        if not cfg.resume:
            cfg = cfg.resolved()  # validate before touching anything
            check_out_dir(cfg.out, False, cfg.force)
        trainer = Trainer(cfg, announce=lambda line: print(line, flush=True))
        if cfg.resume:
            if trainer.cfg.command != cmd:
                raise ValueError(f"resume: '{cfg.out}' holds a {trainer.cfg.command!r} run, not {cmd!r}")
            _check_resume_flags(trainer.cfg, cfg, given)
        try:
            rep = trainer.run()
        finally:
            if dist_started:
                dist.destroy_process_group()
        if trainer.is_main:
            print(json.dumps(rep))
        return 0
    cfg = cfg.resolved()
    if cmd == "export" and not cfg.out:
        raise ValueError("out: export needs --out DIR")
    if "arch" in given:
        _check_arch_flag(cfg)
    if cmd == "eval":
        rep = evaluate_checkpoint(cfg)
        print(json.dumps(rep))
        return 0
    rep = export_checkpoint(cfg, compact=compact)
    print(json.dumps(rep))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (2 on bad input, with a one-line message)."""
    _TRAINING_OUT[0] = None
    try:
        return _run(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    except (ValueError, FileNotFoundError, TypeError, NotADirectoryError, IsADirectoryError,
            ArithmeticError) as e:  # ArithmeticError: the run diverged (NaN/inf), nothing written
        print(f"bip_fast: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, I/O error while writing: the previous checkpoint is kept
        print(f"bip_fast: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bip_fast: interrupted ({_interrupt_note()})", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _interrupt_note() -> str:
    """What an interrupted run left behind, for the one line printed on Ctrl-C."""
    from pathlib import Path

    out = _TRAINING_OUT[0]
    if out is None:
        return "nothing was written"
    if (Path(out) / "checkpoint.pt").is_file():
        return f"'{out}/checkpoint.pt' from the last finished epoch is kept; rerun with --resume to continue"
    return "no epoch had finished, so there is no checkpoint; rerun the same command to start over"


if __name__ == "__main__":
    sys.exit(main())
