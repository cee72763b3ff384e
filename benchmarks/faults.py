"""Fault and bad-input matrix of the CLI: the reliability promises of docs/reliability.md, counted case by case.

Every case runs ``python -m bip_fast ...`` in a subprocess on real CIFAR-10 (a 64/50-image
class-balanced subset, ResNet-20, CPU) and is judged mechanically (benchmarks/_fault_cases.py):
bad input must exit 2 with one stderr line naming the argument, no traceback, and not one byte of
its folder changed; valid commands must exit 0. The custom cases below add divergence, Ctrl-C and
kill -9 at several points (the resumed run must equal an uninterrupted one bit for bit), two runs
started at once on one folder, and full / read-only filesystems (a tmpfs, where mounting is allowed).

    python benchmarks/faults.py                       # all cases, results/faults-cpu.json
    python benchmarks/faults.py --only 'flag --lr'    # a subset (regex on the case name)
    python benchmarks/faults.py --resume --max-minutes 10   # continue; stop after 10 minutes

The JSON holds one record per case (command, exit status, stderr's first line, verdict and why)
and the counts per group. Work files live in build/faults (ignored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _fault_cases import LONG, QUICK, Case, all_cases, judge_refusal, record  # noqa: E402,F401
from _fault_custom import CUSTOM  # noqa: E402
from _common import git_commit  # noqa: E402


class Runner:
    def __init__(self, data: Path, work: Path) -> None:
        self.data, self.work = data, work
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        PYTHONWARNINGS="ignore")

    def argv(self, args: List[str], w: Path, **more) -> List[str]:
        fill = dict(w=str(w), data=str(self.data), **{k: str(v) for k, v in more.items()})
        return [sys.executable, "-m", "bip_fast", *(a.format(**fill) for a in args)]

    def run(self, args: List[str], w: Path, timeout: float = 900, **more) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args, w, **more), capture_output=True, text=True, env=self.env,
                              cwd=ROOT, timeout=timeout)

    def start(self, args: List[str], w: Path) -> subprocess.Popen:
        return subprocess.Popen(self.argv(args, w), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=ROOT)

    def case_dir(self, name: str) -> Path:
        """The case's own empty folder (a tmpfs a previous try left mounted there is released)."""
        w = self.work / "cases" / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        if os.path.ismount(w / "fs"):
            subprocess.run(["umount", "-l", str(w / "fs")], capture_output=True)
        if w.exists():
            shutil.rmtree(w)
        w.mkdir(parents=True)
        return w

    def base(self, name: str) -> Path:
        """A finished run made once and copied into each case that needs it."""
        out = self.work / "base" / name
        if (out / "model.pt").is_file():
            return out
        if out.exists():
            shutil.rmtree(out)
        if name == "dense":
            r = self.run(["pretrain", *QUICK, "--out", str(out)], out)
        elif name == "bip":
            r = self.run(["prune", *QUICK, "--pretrained", str(self.base("dense")), "--out", str(out)], out)
        else:  # "long": the uninterrupted reference of the signal cases
            r = self.run(["pretrain", *LONG, "--data-dir", str(self.data), "--out", str(out)], out)
        if r.returncode != 0:
            raise SystemExit(f"faults: building the {name} run failed:\n{r.stderr[-3000:]}")
        return out

    def bad_data(self, w: Path, batch: str, damage) -> Path:
        """The real batches, linked, with ``batch`` damaged (or missing when ``damage`` is None)."""
        src = self.data / "cifar-10-batches-py"
        if not src.is_dir():
            src = self.data
        dst = w.parent / (w.name + "-data") / "cifar-10-batches-py"
        if dst.parent.exists():
            shutil.rmtree(dst.parent)
        dst.mkdir(parents=True)
        for manifest in ("MD5SUMS", "SHA256SUMS"):  # the copy keeps the data set's checksum lists
            if (src.parent / manifest).is_file():
                shutil.copy2(src.parent / manifest, dst.parent / manifest)
        for f in src.iterdir():
            if f.name == batch:
                if damage is not None:
                    shutil.copy2(f, dst / f.name)
                    damage(dst / f.name)
            else:
                (dst / f.name).symlink_to(f)
        return dst.parent


def snapshot(folder: Path) -> Dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = "dir"
    return out


def changes(before: Dict[str, str], after: Dict[str, str]) -> List[str]:
    return sorted([f"+{k}" for k in after.keys() - before.keys()] + [f"-{k}" for k in before.keys() - after.keys()]
                  + [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def run_case(rn: Runner, case: Case) -> dict:
    w = rn.case_dir(case.name)
    for n in case.needs:
        shutil.copytree(rn.base(n), w / n)
    if case.prep is not None:
        case.prep(w)
    bad = rn.bad_data(w, *case.extra["damage"]) if "damage" in case.extra else ""
    before = snapshot(w)
    t0 = time.perf_counter()
    r = rn.run(case.argv, w, bad=bad)
    secs = time.perf_counter() - t0
    if case.expect == "refuse":
        why = judge_refusal(r, case.needle, changes(before, snapshot(w)))
    else:
        why = [f"exit {r.returncode}"] if r.returncode != 0 else []
        if "Traceback" in r.stderr:
            why.append("traceback")
        if not why and case.check is not None:
            problem = case.check(w)
            if problem:
                why.append(problem)
    return record(case.name, case.group, case.expect, " ".join(case.argv), r, why, secs)


def summarise(results: Dict[str, dict]) -> dict:
    groups: Dict[str, Dict[str, int]] = {}
    for rec in results.values():
        g = groups.setdefault(rec["group"], {"pass": 0, "fail": 0, "skipped": 0})
        g[rec["verdict"]] += 1
    total = {k: sum(g[k] for g in groups.values()) for k in ("pass", "fail", "skipped")}
    return {"total": total, "groups": groups,
            "failed": [f"{r['name']}: {'; '.join(r['why'])}" for r in results.values() if r["verdict"] == "fail"]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("BIP_FAST_DATA", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--work", default=str(ROOT / "build" / "faults"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "faults-cpu.json"))
    ap.add_argument("--only", default=None, help="regex: run only the cases whose name matches")
    ap.add_argument("--resume", action="store_true", help="keep the verdicts already in --json")
    ap.add_argument("--max-minutes", type=float, default=None)
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    if not (data / "cifar-10-batches-py" / "test_batch").is_file() and not (data / "test_batch").is_file():
        print(f"faults: CIFAR-10 not found in '{data}' (--data-dir or BIP_FAST_DATA)", file=sys.stderr)
        return 2
    rn = Runner(data, Path(args.work))
    out = Path(args.json)
    code = git_commit(exclude=("benchmarks/results",))  # {"commit", "dirty"}: the code judged
    results: Dict[str, dict] = {}
    if args.resume and out.is_file():
        results = {r["name"]: r for r in json.loads(out.read_text())["cases"]}
    cases = all_cases() + CUSTOM
    pick = re.compile(args.only) if args.only else None
    t_start = time.time()
    for case in cases:
        name = case.name if isinstance(case, Case) else case[0]
        if (pick and not pick.search(name)) or name in results:
            continue
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print("faults: --max-minutes reached; rerun with --resume to go on", file=sys.stderr)
            break
        try:
            rec = run_case(rn, case) if isinstance(case, Case) else case[2](rn, case[0], case[1])
        except Exception as e:  # the harness itself failed on this case: recorded, not hidden
            rec = record(name, case.group if isinstance(case, Case) else case[1], "harness", "", None,
                         [f"harness error: {type(e).__name__}: {e}"[:400]], 0.0)
        results[name] = rec
        print(f"[{rec['verdict']:>7}] {name}  ({rec['exit']}, {rec['seconds']} s) {'; '.join(rec['why'])}",
              file=sys.stderr, flush=True)
        doc = {"benchmark": "faults", **code, "device": "cpu", "cpu": platform.processor() or platform.machine(),
               "python": platform.python_version(), "config": {"quick": QUICK, "long": LONG, "data": str(data)},
               "summary": summarise(results), "cases": list(results.values())}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(out)
    s = summarise(results)
    print(json.dumps(s["total"]), file=sys.stderr)
    return 0 if not s["failed"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
