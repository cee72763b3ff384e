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
    python -m bip_fast export --checkpoint runs/grp50 --out runs/grp50/export --compact --onnx

A training command (pretrain, prune, finetune) prints its plan as the first line on stdout before
its first step: every segment (dense phase, pruning, finetuning) with its epochs and steps, and
BiP's resolved score lr; its last line is the results as JSON.

Bad input prints one line ``bip_fast: error: ...`` on stderr and exits with status 2; nothing is
written in that case. A run folder that already holds a run is refused unless ``--resume`` (to
continue it) or ``--force`` (to overwrite it). Under torchrun (WORLD_SIZE > 1) the process group
is initialised from the environment and only rank 0 writes files and prints.

Ctrl-C (SIGINT) at any moment ends a command with status 130 and one line on stderr saying what
was left (a checkpoint to ``--resume``, or nothing), unless the command had already done all its
work (a training run's results.json written), which then exits 0 with its results printed.
:func:`main` installs its own SIGINT handler for this, also where the process inherited SIGINT
*ignored*: a shell starts a background job (``cmd &`` in a script, or any non-interactive shell
without job control) with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
at all, so such a run used to ignore Ctrl-C and finish with status 0; only a signal landing inside
a checkpoint write got through there (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from typing import List, Optional

import torch.distributed as dist

from .engine.evaluation import evaluate_checkpoint, export_checkpoint
from .engine.hparams import COMMANDS, DataHparams, RunConfig, add_flags, fixed_series_sparsity, load_yaml
from .engine.loop import Trainer
from .engine.rundir import check_out_dir, read_model_file
from .engine.setup import init_distributed_from_env
from .onnx_export import OnnxExportError

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
    "export": "write --checkpoint as a plain PyTorch model (model_dense_format.pt) and masks.pt; --compact adds "
              "model_compact.pt2, --onnx an ONNX file checked with ONNX Runtime",
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
            run.add_argument("--onnx", action="store_true",
                             help="also write model.onnx (the dense-format model), or with --compact model_compact.onnx "
                                  "(the compacted one), checked with ONNX Runtime; needs onnx, onnxscript, onnxruntime")
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
    cfg = RunConfig.from_flat(flat)
    _check_fixed_series(cfg, "sparsity" in flat)
    return cfg, set(given)


def _check_fixed_series(cfg: RunConfig, sparsity_given: bool) -> None:
    """``--rounds R`` runs IMP's fixed series, which ends where it ends (1 - (1 - imp_rate)^R); a
    --sparsity (flag or config) that says otherwise is refused rather than silently replaced."""
    p = cfg.prune
    if p.rounds is None or not sparsity_given or p.rounds < 1 or not 0.0 < p.imp_rate < 1.0:
        return  # nothing to compare (validation names a bad --rounds / --imp-rate)
    end = fixed_series_sparsity(p.imp_rate, p.rounds)
    if abs(p.sparsity - end) > 1e-9:
        raise ValueError(f"sparsity: --rounds {p.rounds} at --imp-rate {p.imp_rate:g} is the fixed series, which "
                         f"ends at sparsity {end:.6g}; got --sparsity {p.sparsity:g} (from the flag or --config): "
                         f"drop --rounds to land on it, or drop --sparsity")


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


class _CtrlC:
    """The SIGINT handler of :func:`main`: the first Ctrl-C raises KeyboardInterrupt (the command
    ends with status 130); once the outcome is decided (``settled``: the work is done, or an error
    or an interrupt is being reported) further ones change nothing, so the one line and the exit
    status stay what they are."""

    def __init__(self) -> None:
        self.settled = False

    def __call__(self, signum, frame) -> None:
        if not self.settled:
            self.settled = True
            raise KeyboardInterrupt


def _take_sigint(handler: _CtrlC):
    """Install ``handler`` for SIGINT (whatever the inherited disposition, ignored included);
    returns the previous handler, or None where signals cannot be handled (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # no signals here (embedded interpreter)
        return None


def _run(argv: Optional[List[str]], ctrl_c: _CtrlC) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    compact = bool(vars(args).pop("compact", False))  # export's own flags, not run settings
    onnx = bool(vars(args).pop("onnx", False))
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
        ctrl_c.settled = True  # every file is written: a Ctrl-C from here on cannot undo the run
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
        ctrl_c.settled = True
        print(json.dumps(rep))
        return 0
    rep = export_checkpoint(cfg, compact=compact, onnx=onnx)
    ctrl_c.settled = True
    print(json.dumps(rep))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (2 on bad input, with a one-line message; 130 on
    Ctrl-C, see the module docstring).

    ``main()`` (no ``argv``: this process's own command line, as ``python -m bip_fast`` and the
    ``bip-fast`` script call it) leaves its settled SIGINT handler in place when it returns, so a
    Ctrl-C while the interpreter exits cannot change the status; ``main(argv)`` restores the
    caller's handler before returning.
    """
    _TRAINING_OUT[0] = None
    ctrl_c = _CtrlC()
    previous = _take_sigint(ctrl_c)
    try:
        return _main(argv, ctrl_c)
    finally:
        if argv is not None and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: Optional[List[str]], ctrl_c: _CtrlC) -> int:
    # Each branch settles first (a plain attribute store: no signal handler can run before it);
    # a KeyboardInterrupt raised anywhere inside reaches the outer handler.
    try:
        try:
            return _run(argv, ctrl_c)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
            ctrl_c.settled = True
            return e.code if isinstance(e.code, int) else 2
        except (ValueError, FileNotFoundError, TypeError, NotADirectoryError, IsADirectoryError,
                ArithmeticError, OnnxExportError) as e:  # ArithmeticError: the run diverged (NaN/inf), nothing written
            ctrl_c.settled = True
            print(f"bip_fast: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except OSError as e:  # disk full, I/O error while writing: the previous checkpoint is kept
            ctrl_c.settled = True
            print(f"bip_fast: error: {_one_line(e)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        ctrl_c.settled = True  # the handler settled already, unless the interrupt was raised by code
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
