"""The cases of benchmarks/faults.py: bad flags, folder states, damaged files and data, eval/export.

A case is a CLI command line (placeholders: ``{w}`` the case's own folder, ``{data}`` the real
CIFAR-10 folder, ``{dense}``/``{bip}`` copies of a finished dense / BiP run made for the case, ``{bad}``
a damaged copy of the data set) and what docs/reliability.md promises for it:

- ``refuse``: exit status 2, one line on stderr naming ``needle``, no traceback, and not one byte
  of the case's folder changed or added;
- ``ok``: exit status 0, no traceback, and ``check(folder)`` (if any) returns None.

The signal, concurrency, divergence and filesystem cases run custom sequences (faults.py).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from bip_fast.files import checkpoint as ckpt
from bip_fast.files.runlock import LOCK_NAME

QUICK = ["--arch", "resnet20", "--data-dir", "{data}", "--subset", "64", "50", "--batch-size", "32",
         "--test-batch-size", "50", "--device", "cpu", "--epochs", "1", "--no-progress"]
LONG = ["--arch", "resnet20", "--subset", "512", "100", "--batch-size", "32", "--test-batch-size", "100",
        "--device", "cpu", "--epochs", "3", "--no-progress"]  # the signal cases' runs


def lines_of(stderr: str) -> List[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def judge_refusal(r, needle: str, changed=(), code: Optional[int] = 2, fold: bool = True) -> List[str]:
    """Why ``r`` is not a one-line refusal naming ``needle`` (empty when it is): exit status
    ``code`` (None: any), one stderr line, no traceback, ``needle`` in it (``fold``: ignoring case
    and -/_), and no ``changed`` file."""
    why = []
    lines = lines_of(r.stderr)
    if code is not None and r.returncode != code:
        why.append(f"exit {r.returncode}")
    if len(lines) != 1:
        why.append(f"{len(lines)} stderr lines")
    if "Traceback" in r.stderr:
        why.append("traceback")
    norm = (lambda s: s.lower().replace("-", "_")) if fold else (lambda s: s)
    if needle and not any(norm(needle) in norm(ln) for ln in lines):
        why.append(f"message does not name {needle!r}")
    if changed:
        why.append(f"folder changed: {list(changed)[:6]}")
    return why


def record(name, group, expect, command, r, why, secs, verdict=None) -> dict:
    """One case's result record (``r``: the CompletedProcess, None when the case did not run)."""
    lines = lines_of(r.stderr) if r is not None else []
    return {"name": name, "group": group, "expect": expect, "command": command,
            "exit": None if r is None else r.returncode, "stderr_lines": len(lines),
            "message": lines[-1][:400] if lines else "", "seconds": round(secs, 2),
            "verdict": verdict or ("pass" if not why else "fail"), "why": why}


@dataclass
class Case:
    name: str
    group: str
    argv: List[str]
    expect: str = "refuse"
    needle: str = ""
    needs: tuple = ()  # base runs copied into the case folder: "dense", "bip"
    prep: Optional[Callable[[Path], None]] = None
    check: Optional[Callable[[Path], Optional[str]]] = None
    extra: dict = field(default_factory=dict)


def _flip(path: Path, n: int = 32) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _swap_checkpoint(w: Path) -> None:  # the BiP run's checkpoint inside the dense run's folder
    shutil.copy2(w / "bip" / "checkpoint.pt", w / "dense" / "checkpoint.pt")


def _edit_config(w: Path) -> None:
    p = w / "dense" / "config.yaml"
    p.write_text(p.read_text().replace("resnet20", "resnet32"))


def _exists(*names) -> Callable[[Path], Optional[str]]:
    def check(w: Path) -> Optional[str]:
        missing = [n for n in names if not (w / n).exists()]
        return f"missing {missing}" if missing else None
    return check


def flag_cases() -> List[Case]:
    """One bad value per flag: exit 2, one line naming the flag, no folder created."""
    bad = {
        "sparsity": ["-0.1", "1.0", "1.5", "nan", "inf", "abc"],
        "lr": ["-1", "nan", "inf", "abc"],
        "epochs": ["0", "-1", "1.5", "abc"],
        "batch-size": ["0", "-8", "abc"],
        "test-batch-size": ["0"],
        "seed": ["-1", "abc"],
        "momentum": ["-0.1", "nan"],
        "weight-decay": ["-1", "inf"],
        "method": ["foo"], "arch": ["foo"], "structure": ["foo"], "dataset": ["foo"],
        "variant": ["foo"], "schedule": ["foo"],
        "device": ["foo", "cuda:7"],
        "score-lr": ["-1", "nan"], "imp-rate": ["0", "1.5"], "gamma": ["-1"],
        "gmp-every": ["0"], "synflow-rounds": ["0"], "grasp-temperature": ["0"], "score-samples": ["0"],
        "nonfinite-skips": ["-1"], "workers": ["-1"], "log-interval": ["0"],
    }
    cases = []
    for flag, values in bad.items():
        for v in values:
            method = {"imp-rate": "imp", "gmp-every": "gmp", "synflow-rounds": "synflow",
                      "grasp-temperature": "grasp", "score-samples": "snip"}.get(flag, "bip")
            argv = ["prune", "--out", "{w}/run", "--method", method, *QUICK, f"--{flag}", v]
            cases.append(Case(f"flag --{flag} {v}", "flags", argv, needle=flag))
    cases += [
        Case("flag --subset 64", "flags", ["prune", "--out", "{w}/run", "--subset", "64"], needle="subset"),
        Case("flag --subset 0 50", "flags", ["prune", "--out", "{w}/run", *QUICK, "--subset", "0", "50"],
             needle="subset"),
        Case("flag --nm 0.3", "flags", ["prune", "--out", "{w}/run", *QUICK, "--structure", "nm", "--sparsity", "0.3"],
             needle="sparsity"),
        Case("flag hydra --nm 0.9", "flags", ["prune", "--out", "{w}/run", *QUICK, "--method", "hydra",
                                               "--structure", "nm", "--sparsity", "0.9"], needle="sparsity"),
        Case("flag --nm-n 5 --nm-m 4", "flags", ["prune", "--out", "{w}/run", *QUICK, "--structure", "nm",
                                                  "--nm-n", "5", "--nm-m", "4"], needle="nm"),
        Case("flag --resume --force", "flags", ["prune", "--out", "{w}/run", "--resume", "--force"], needle="force"),
        Case("flag --config missing", "flags", ["prune", "--out", "{w}/run", "--config", "{w}/none.yaml"],
             needle="config"),
        Case("flag --config not yaml", "flags", ["prune", "--out", "{w}/run", "--config", "{w}/c.yaml"],
             needle="config", prep=lambda w: (w / "c.yaml").write_text("train: [1, 2\n  lr: :\n")),
        Case("flag --config unknown key", "flags", ["prune", "--out", "{w}/run", "--config", "{w}/c.yaml"],
             needle="learning_rate", prep=lambda w: (w / "c.yaml").write_text("train:\n  learning_rate: 0.1\n")),
        Case("flag --data-dir missing", "flags", ["pretrain", "--out", "{w}/run", *QUICK, "--data-dir", "{w}/none"],
             needle="cifar10"),
        Case("flag eval --sparsity", "flags", ["eval", "--checkpoint", "{w}/dense", "--sparsity", "0.5"],
             needle="sparsity", needs=("dense",)),
        Case("flag eval --arch other", "flags", ["eval", "--checkpoint", "{w}/dense", "--arch", "resnet56",
                                                 "--data-dir", "{data}", "--device", "cpu"],
             needle="arch", needs=("dense",)),
        Case("flag pretrain --pretrained", "flags", ["prune", "--out", "{w}/run", *QUICK, "--pretrained",
                                                     "{w}/none.pt"], needle="pretrained"),
    ]
    return cases


def folder_cases() -> List[Case]:
    """Run folders in every state a user meets: existing, damaged, swapped, locked."""
    d = ["--out", "{w}/dense", "--resume"]
    return [
        Case("out is a file", "folders", ["pretrain", *QUICK, "--out", "{w}/f"], needle="out",
             prep=lambda w: (w / "f").write_text("x")),
        Case("out holds a run", "folders", ["pretrain", *QUICK, "--out", "{w}/dense"], needle="out",
             needs=("dense",)),
        Case("resume empty folder", "folders", ["pretrain", "--out", "{w}/e", "--resume"], needle="checkpoint",
             prep=lambda w: (w / "e").mkdir()),
        Case("resume missing folder", "folders", ["pretrain", "--out", "{w}/none", "--resume"], needle="resume"),
        Case("resume flipped checkpoint", "folders", ["pretrain", *d], needle="corrupted", needs=("dense",),
             prep=lambda w: _flip(w / "dense" / "checkpoint.pt")),
        Case("resume truncated checkpoint", "folders", ["pretrain", *d], needle="checkpoint.pt", needs=("dense",),
             prep=lambda w: _truncate(w / "dense" / "checkpoint.pt")),
        Case("resume empty checkpoint", "folders", ["pretrain", *d], needle="checkpoint.pt", needs=("dense",),
             prep=lambda w: _empty(w / "dense" / "checkpoint.pt")),
        Case("resume another run's checkpoint", "folders", ["pretrain", *d], needle="checkpoint",
             needs=("dense", "bip"), prep=_swap_checkpoint),
        Case("resume edited config.yaml", "folders", ["pretrain", *d], needle="config", needs=("dense",),
             prep=_edit_config),
        Case("resume finished run", "folders", ["pretrain", *d], expect="ok", needs=("dense",)),
        Case("resume without metrics.jsonl", "folders", ["pretrain", *d], expect="ok", needs=("dense",),
             prep=lambda w: (w / "dense" / "metrics.jsonl").unlink(), check=_exists("dense/model.pt")),
        Case("force over a run", "folders", ["pretrain", *QUICK, "--out", "{w}/dense", "--force"], expect="ok",
             needs=("dense",), check=_exists("dense/model.pt", "dense/checkpoint.pt")),
        Case("leftover tmp and stale lock", "folders", ["pretrain", *QUICK, "--out", "{w}/run"], expect="ok",
             prep=lambda w: ((w / "run").mkdir(), (w / "run" / ".checkpoint.pt.x1.tmp").write_bytes(b"x" * 999),
                             (w / "run" / LOCK_NAME).write_text('{"pid": 999999, "host": "gone"}')),
             check=lambda w: "leftovers kept" if list((w / "run").glob(".*.tmp")) else None),
    ]


def file_cases() -> List[Case]:
    """eval / export / finetune / --pretrained on good and damaged files."""
    ev = ["--data-dir", "{data}", "--device", "cpu", "--subset", "64", "50", "--test-batch-size", "50"]
    return [
        Case("eval good", "files", ["eval", "--checkpoint", "{w}/bip", *ev], expect="ok", needs=("bip",)),
        Case("eval missing", "files", ["eval", "--checkpoint", "{w}/none.pt", *ev], needle="checkpoint"),
        Case("eval folder without model", "files", ["eval", "--checkpoint", "{w}/e", *ev], needle="checkpoint",
             prep=lambda w: (w / "e").mkdir()),
        Case("eval flipped model.pt", "files", ["eval", "--checkpoint", "{w}/bip/model.pt", *ev],
             needle="corrupted", needs=("bip",), prep=lambda w: _flip(w / "bip" / "model.pt")),
        Case("eval truncated model.pt", "files", ["eval", "--checkpoint", "{w}/bip/model.pt", *ev],
             needle="model.pt", needs=("bip",), prep=lambda w: _truncate(w / "bip" / "model.pt")),
        Case("eval text file", "files", ["eval", "--checkpoint", "{w}/m.pt", *ev], needle="m.pt",
             prep=lambda w: (w / "m.pt").write_text("not a model")),
        Case("export good", "files", ["export", "--checkpoint", "{w}/bip", "--out", "{w}/x"], expect="ok",
             needs=("bip",), check=_exists("x/model_dense_format.pt", "x/masks.pt")),
        Case("export over an export", "files", ["export", "--checkpoint", "{w}/bip", "--out", "{w}/bip"],
             needle="out", needs=("bip",)),
        Case("export flipped", "files", ["export", "--checkpoint", "{w}/bip/model.pt", "--out", "{w}/x"],
             needle="corrupted", needs=("bip",), prep=lambda w: _flip(w / "bip" / "model.pt")),
        Case("finetune good", "files", ["finetune", "--checkpoint", "{w}/bip", *QUICK, "--out", "{w}/ft"],
             expect="ok", needs=("bip",), check=_exists("ft/model.pt")),
        Case("finetune flipped", "files", ["finetune", "--checkpoint", "{w}/bip", *QUICK, "--out", "{w}/ft"],
             needle="corrupted", needs=("bip",), prep=lambda w: _flip(w / "bip" / "model.pt")),
        Case("prune from flipped pretrained", "files", ["prune", *QUICK, "--pretrained", "{w}/dense/model.pt",
                                                         "--out", "{w}/p"], needle="corrupted",
             needs=("dense",), prep=lambda w: _flip(w / "dense" / "model.pt")),
        Case("prune from another arch", "files", ["prune", *QUICK, "--arch", "resnet32", "--pretrained",
                                                   "{w}/dense", "--out", "{w}/p"], needle="arch", needs=("dense",)),
        Case("prune good", "files", ["prune", *QUICK, "--pretrained", "{w}/dense", "--out", "{w}/p"],
             expect="ok", needs=("dense",), check=_exists("p/model.pt", "p/masks.pt")),
        # a 1-epoch pretrain never reaches the rewind epoch (3), so it keeps no rewind.pt
        Case("prune imp from a model without rewind weights", "files",
             ["prune", *QUICK, "--method", "imp", "--sparsity", "0.2", "--pretrained", "{w}/dense", "--out", "{w}/p"],
             needle="rewind.pt", needs=("dense",)),
    ]


def data_cases() -> List[Case]:
    """A damaged copy of the data set ({bad}: the real batches, one of them damaged per case)."""
    cases = []
    for what, fn in (("truncated", _truncate), ("empty", _empty), ("flipped", _flip)):
        for batch in ("data_batch_3", "test_batch"):
            cases.append(Case(f"data {what} {batch}", "data", ["pretrain", *QUICK, "--data-dir", "{bad}",
                                                              "--out", "{w}/run"], needle=batch,
                              extra={"damage": (batch, fn)}))
    cases.append(Case("data missing data_batch_5", "data", ["pretrain", *QUICK, "--data-dir", "{bad}",
                                                            "--out", "{w}/run"], needle="data_batch_5",
                      extra={"damage": ("data_batch_5", None)}))
    return cases


def _masks(path: Path):
    return ckpt.load(path)["masks"]


def _exact_k(sparsity: float, structure: str = "global") -> Callable[[Path], Optional[str]]:
    """masks.pt, counted independently of the run's own report: exactly K kept (global), and for
    filter/channel pruning at least one filter/channel left in every layer."""
    def check(w: Path) -> Optional[str]:
        masks = _masks(w / "p" / "masks.pt")
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        def k(n):
            return min(n, int(math.floor((1.0 - sparsity) * n + 0.5)))
        if structure == "global" and kept != k(total):
            return f"kept {kept} weights, expected K = {k(total)}"
        if structure == "layer":
            off = [n for n, m in masks.items() if int(m.sum()) != k(m.numel())]
            if off:
                return f"layers not at exactly K: {off[:4]}"
        if structure in ("filter", "channel"):
            dim = 0 if structure == "filter" else 1
            empty = [n for n, m in masks.items() if not m.transpose(0, dim).flatten(1).any(1).any()]
            if empty:
                return f"layers left without any {structure}: {empty[:4]}"
        return None
    return check


def method_cases() -> List[Case]:
    """Valid prune runs, every method and structure: exit 0, and the saved masks hold what was asked."""
    cases = []
    for method in ("bip", "omp", "hydra", "gmp", "snip", "grasp", "synflow"):
        pre = ["--pretrained", "{w}/dense"] if method in ("bip", "omp", "hydra", "gmp") else []
        structure = "layer" if method == "hydra" else "global"  # Hydra's default is layer-wise
        cases.append(Case(f"prune {method} 0.8", "methods", ["prune", *QUICK, "--method", method, "--sparsity", "0.8",
                                                            *pre, "--out", "{w}/p"],
                          expect="ok", needs=("dense",) if pre else (), check=_exact_k(0.8, structure)))
    cases.append(Case("prune bip nm: a layer that cannot be 2:4", "methods",
                      ["prune", *QUICK, "--structure", "nm", "--sparsity", "0.5", "--pretrained", "{w}/dense",
                       "--out", "{w}/p"], needle="layer 'conv1'", needs=("dense",)))
    for structure, s in (("filter", "0.99"), ("channel", "0.99"), ("layer", "0.7")):
        cases.append(Case(f"prune bip {structure} {s}", "methods",
                          ["prune", *QUICK, "--structure", structure, "--sparsity", s, "--pretrained", "{w}/dense",
                           "--out", "{w}/p"], expect="ok", needs=("dense",), check=_exact_k(float(s), structure)))
    return cases


def config_cases() -> List[Case]:
    """A --config file with a bad value is refused like the flag itself."""
    bad = {"sparsity 2": "prune:\n  sparsity: 2\n", "lr text": "train:\n  lr: fast\n",
           "unknown section": "optimizer:\n  lr: 0.1\n", "epochs list": "train:\n  epochs: [1, 2]\n",
           "not a mapping": "- 1\n- 2\n"}
    needles = {"sparsity 2": "sparsity", "lr text": "lr", "unknown section": "optimizer",
               "epochs list": "epochs", "not a mapping": "config"}
    return [Case(f"config {k}", "flags", ["prune", "--out", "{w}/run", "--config", "{w}/c.yaml"], needle=needles[k],
                 prep=lambda w, t=t: (w / "c.yaml").write_text(t)) for k, t in bad.items()]


def all_cases() -> List[Case]:
    return flag_cases() + config_cases() + folder_cases() + file_cases() + data_cases() + method_cases()
