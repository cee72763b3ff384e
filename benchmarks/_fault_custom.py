"""The custom sequences of benchmarks/faults.py: divergence, Ctrl-C and kill -9, two runs at once,
full and read-only filesystems. Each is ``(name, group, fn(runner, name, group) -> record)``."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import torch

from _fault_cases import LONG, QUICK, judge_refusal, record
from bip_fast.files import checkpoint as ckpt
from bip_fast.files.runlock import LOCK_NAME as LOCK


def _rec(name, group, command, r, why, secs, verdict=None):
    return record(name, group, "custom", command, r, why, secs, verdict)


def _same_model(a: Path, b: Path) -> List[str]:
    x, y = ckpt.load(a), ckpt.load(b)
    if x.keys() != y.keys():
        return ["model.pt keys differ from the uninterrupted run"]
    diff = [k for k in x if not torch.equal(x[k], y[k])]
    return [f"model.pt differs from the uninterrupted run in {diff[:3]}"] if diff else []


def diverge(cmd: str):
    def fn(rn, name, group):
        w = rn.case_dir(name)
        pre = ["--pretrained", str(rn.base("dense"))] if cmd == "prune" else []
        args = [cmd, *QUICK, *pre, "--lr", "1e6", "--epochs", "2", "--out", "{w}/run"]
        t0 = time.perf_counter()
        r = rn.run(args, w)
        why = judge_refusal(r, "diverged", fold=False)
        if (w / "run" / "model.pt").exists():
            why.append("model.pt written")
        m = w / "run" / "metrics.jsonl"
        if m.exists():
            try:
                [json.loads(ln, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
                 for ln in m.read_text().splitlines()]
            except ValueError as e:
                why.append(f"metrics.jsonl not strict JSON ({e})")
        if (w / "run" / "checkpoint.pt").exists():
            st = ckpt.load(w / "run" / "checkpoint.pt")["model"]
            if not all(torch.isfinite(v).all() for v in st.values() if v.is_floating_point()):
                why.append("checkpoint.pt holds NaN/inf")
        return _rec(name, group, " ".join(args), r, why, time.perf_counter() - t0)
    return fn


def _wait(path_or_glob, proc, w: Path, timeout=600, poll=0.002) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        hit = list(w.glob(path_or_glob))
        if hit:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def interrupt(sig: int, when: str):
    """``when``: "start" (before the first checkpoint), "ckpt" (after it), "write" (inside a
    checkpoint write, caught by polling for its temporary file; up to 3 tries)."""
    def fn(rn, name, group):
        ref = rn.base("long")
        w = rn.case_dir(name)
        args = ["pretrain", *LONG, "--data-dir", str(rn.data), "--out", "{w}/run"]
        t0 = time.perf_counter()
        target = {"start": "run/config.yaml", "ckpt": "run/checkpoint.pt", "write": "run/.checkpoint.pt.*.tmp"}[when]
        for _ in range(3):
            if (w / "run").exists():
                shutil.rmtree(w / "run")
            p = rn.start(args, w)
            hit = _wait(target, p, w)
            if hit:
                p.send_signal(sig)
            _, err = p.communicate(timeout=900)
            if hit:
                break
        if not hit:
            return _rec(name, group, " ".join(args), None, [f"the window was never hit (exit {p.returncode}: "
                                                            f"{err.strip()[-200:]})"], time.perf_counter() - t0,
                        "skipped")
        r = subprocess.CompletedProcess(args, p.returncode, "", err)
        why = []
        if sig == signal.SIGINT:
            why += judge_refusal(r, "interrupted", code=130, fold=False)
        if (w / "run" / "checkpoint.pt").exists():
            again = rn.run(["pretrain", "--out", "{w}/run", "--resume"], w)
        else:  # nothing to resume: the same command again, without --force
            again = rn.run(args, w)
        if again.returncode != 0:
            why.append(f"continuing failed: exit {again.returncode}: {again.stderr.strip()[-300:]}")
        else:
            why += _same_model(w / "run" / "model.pt", ref / "model.pt")
            if list((w / "run").glob(".*.tmp")) or (w / "run" / LOCK).exists():
                why.append("temporary files or the lock left behind")
        return _rec(name, group, " ".join(args), r, why, time.perf_counter() - t0)
    return fn


def two_at_once(rn, name, group):
    w = rn.case_dir(name)
    args = ["prune", *QUICK, "--pretrained", str(rn.base("dense")), "--out", "{w}/run"]
    t0 = time.perf_counter()
    procs = [rn.start(args, w) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    codes = sorted(p.returncode for p in procs)
    why = [] if codes == [0, 2] else [f"exit statuses {codes}, expected one 0 and one 2"]
    loser = [o[1] for p, o in zip(procs, outs) if p.returncode == 2]
    if loser and "in use" not in loser[0]:
        why.append(f"refusal does not say the folder is in use: {loser[0].strip()[:200]}")
    res = w / "run" / "results.json"
    if not res.is_file() or not (w / "run" / "model.pt").is_file():
        why.append("the winner's results are incomplete")
    else:
        ckpt.load(w / "run" / "model.pt")
    r = subprocess.CompletedProcess(args, codes[-1], "", loser[0] if loser else "")
    return _rec(name, group, " ".join(args) + "  (twice, at once)", r, why, time.perf_counter() - t0)


def filesystem(kind: str):
    def fn(rn, name, group):
        w = rn.case_dir(name)
        fs = w / "fs"
        fs.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fs)],
                                 capture_output=True).returncode == 0
        if not mounted:
            return _rec(name, group, "", None, ["cannot mount a tmpfs here"], 0.0, "skipped")
        try:
            t0 = time.perf_counter()
            if kind == "full":
                subprocess.run(["dd", "if=/dev/zero", f"of={fs / 'filler'}", "bs=64k"], capture_output=True)
                args, needle = ["pretrain", *QUICK, "--out", "{w}/fs/run"], "No space left on device"
            else:
                shutil.copytree(rn.base("dense"), fs / "dense")
                subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, capture_output=True)
                args, needle = ["pretrain", "--out", "{w}/fs/dense", "--resume"], "Read-only file system"
            before = sorted(str(p) for p in fs.rglob("*"))
            r = rn.run(args, w)
            why = [] if r.returncode in (1, 2) else [f"exit {r.returncode}"]
            why += judge_refusal(r, needle, code=None, fold=False)
            if sorted(str(p) for p in fs.rglob("*")) != before:
                why.append("files added or removed")
            return _rec(name, group, " ".join(args), r, why, time.perf_counter() - t0)
        finally:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)
    return fn


CUSTOM = [
    ("diverge pretrain --lr 1e6", "divergence", diverge("pretrain")),
    ("diverge prune bip --lr 1e6", "divergence", diverge("prune")),
    ("SIGINT before the first checkpoint", "signals", interrupt(signal.SIGINT, "start")),
    ("SIGINT after the first checkpoint", "signals", interrupt(signal.SIGINT, "ckpt")),
    ("SIGINT inside a checkpoint write", "signals", interrupt(signal.SIGINT, "write")),
    ("kill -9 before the first checkpoint", "signals", interrupt(signal.SIGKILL, "start")),
    ("kill -9 after the first checkpoint", "signals", interrupt(signal.SIGKILL, "ckpt")),
    ("kill -9 inside a checkpoint write", "signals", interrupt(signal.SIGKILL, "write")),
    ("two prune runs at once on one folder", "concurrency", two_at_once),
    ("full disk before the first write", "filesystems", filesystem("full")),
    ("resume on a read-only filesystem", "filesystems", filesystem("ro")),
]
