"""Render summary.md of a scripts/gpu_check.sh run from its work folder (standard library only).

gpu_check.sh calls this after every step, so the summary in the output folder is always current:
a stage that is still running when the call is cut off shows as RUNNING, with its time so far.
It reads the work folder's status.tsv (one row per finished step: name, status, exit code,
seconds, timeout, note), current (the step running now), logs/*.log, build_info.json and
junit.xml, and never imports torch.

    python3 scripts/gpu_check_report.py --work build/gpu-check --out gpu-results
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

TAIL_ON_FAILURE = 25


def read_lines(path: str) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def read_status(work: str) -> List[Dict[str, str]]:
    rows = []
    for line in read_lines(os.path.join(work, "status.tsv")):
        parts = line.split("\t")
        if len(parts) >= 5:
            rows.append(dict(zip(("name", "status", "rc", "seconds", "timeout", "note"), parts + [""])))
    return rows


def read_current(work: str) -> Optional[Dict[str, str]]:
    lines = read_lines(os.path.join(work, "current"))
    if not lines:
        return None
    parts = lines[0].split("\t")
    if len(parts) < 3:
        return None
    try:
        elapsed = int(time.time()) - int(parts[1])
    except ValueError:
        elapsed = 0
    return {"name": parts[0], "status": "RUNNING", "rc": "-", "seconds": str(elapsed), "timeout": parts[2],
            "note": "still running when this summary was written (cut off if nothing follows)"}


def log(work: str, name: str) -> List[str]:
    return read_lines(os.path.join(work, "logs", f"{name}.log"))


def fenced(lines: List[str]) -> List[str]:
    return ["```"] + [ln.replace("```", "'''") for ln in lines] + ["```"]


def junit_summary(path: str) -> Optional[Dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = collections.Counter()
    failed, skips = [], collections.Counter()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0) or 0)
        counts["time"] += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    msg = (el.get("message") or "").strip().splitlines()
                    failed.append(f"{tag}: {name}: {msg[0][:200] if msg else ''}")
            el = case.find("skipped")
            if el is not None:
                reason = (el.get("message") or "").strip()
                reason = re.sub(r"^.*?Skipped: ", "", reason)[:160]
                skips[reason] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": counts, "failed": failed, "skips": skips}


def log_test_counts(lines: List[str]) -> collections.Counter:
    """Outcomes from `pytest -v` lines, for a run cut off before it wrote its junit XML."""
    c = collections.Counter()
    for ln in lines:
        m = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", ln)
        if m and "::" in ln:
            c[m.group(1)] += 1
    return c


def section_env(work: str) -> List[str]:
    out = ["## Environment", ""]
    lines = [ln[5:] for ln in log(work, "env") if ln.startswith("env: ")]
    out += [f"- {ln}" for ln in lines] or ["- (env stage did not run)"]
    return out + [""]


def section_build(work: str) -> List[str]:
    out = ["## Build", ""]
    lines = [ln.strip() for ln in log(work, "build") + log(work, "build-inplace") if "bip_fast build:" in ln]
    out += [f"- {ln}" for ln in lines[-8:]]
    try:
        with open(os.path.join(work, "build_info.json")) as f:
            info = json.load(f)
        out += ["", "`bip_fast.build_info()`:", ""] + fenced(json.dumps(info, indent=1, sort_keys=True,
                                                                       default=str).splitlines())
    except (OSError, ValueError):
        out.append("- build_info.json: not written")
    return out + [""]


def section_tests(work: str) -> List[str]:
    out = ["## Tests (GPU, compiled Triton)", ""]
    j = junit_summary(os.path.join(work, "junit.xml"))
    lines = log(work, "tests")
    if j is not None:
        c = j["counts"]
        out.append(f"- {c['tests']} tests: {c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
                   f"{c['skipped']} skipped ({c['time']:.0f} s)")
        if j["failed"]:
            out += ["", "Failures:", ""] + [f"- {x}" for x in j["failed"][:40]]
            if len(j["failed"]) > 40:
                out.append(f"- ... and {len(j['failed']) - 40} more (junit.xml in logs.tar.gz)")
        if j["skips"]:
            out += ["", "Skip reasons (count):", ""]
            out += [f"- {n} x {r or '(no reason)'}" for r, n in j["skips"].most_common(12)]
    elif lines:
        c = log_test_counts(lines)
        out.append("- no junit XML (the run was cut off); outcomes read from the log: "
                   + (", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"))
        out += [f"- {ln.strip()}" for ln in lines if re.search(r"\bFAILED\b.*::", ln)][:40]
    else:
        out.append("- did not run")
    try:
        i = next(k for k, ln in enumerate(lines) if "slowest" in ln and "durations" in ln)
        slow = [ln for ln in lines[i + 1:i + 12] if re.match(r"^\d+\.\d+s ", ln)]
        if slow:
            out += ["", "Slowest:", ""] + fenced(slow)
    except StopIteration:
        pass
    return out + [""]


def section_sanitizer(work: str) -> List[str]:
    out = ["## compute-sanitizer", ""]
    found = False
    for name in ("sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-memcheck-triton"):
        lines = log(work, name)
        if not lines:
            continue
        found = True
        summary = [ln.strip() for ln in lines if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        smoke = [ln.strip() for ln in lines if ln.startswith("ops_smoke")]
        out.append(f"- {name}: " + ("; ".join(summary) if summary else "no sanitizer summary line"))
        out += [f"  - {ln}" for ln in smoke if "FAIL" in ln or "unavailable" in ln or ln.startswith("ops_smoke:")]
        errors = [ln.strip() for ln in lines if ln.startswith("=========") and "SUMMARY" not in ln and
                  re.search(r"(Invalid|Race|Error|error|hazard|Hazard|not supported)", ln)]
        out += [f"  - {ln}" for ln in errors[:10]]
    if not found:
        out.append("- did not run")
    return out + [""]


def section_bench(work: str, name: str, title: str) -> List[str]:
    out = [f"## {title}", ""]
    lines = log(work, name)
    if not lines:
        return out + ["- did not run", ""]
    table = [ln for ln in lines if ln.startswith("|")]
    notes = [ln for ln in lines if re.match(r"^(targets:|error:|not benchmarked|stopped after|- \d|"
                                            r"- dense start|CIFAR-10 not found|--resume:|wall-clock)", ln)]
    out += table + ([""] if table else []) + [f"- {ln.lstrip('- ')}" for ln in notes]
    if not table and not notes:
        out.append("- no results in its log (its last lines follow if it failed)")
    return out + [""]


def render(args) -> str:
    work = args.work
    rows = read_status(work)
    cur = read_current(work)
    if cur:
        rows.append(cur)
    elapsed = int(time.time()) - args.start if args.start else None
    out = ["# GPU check (scripts/gpu_check.sh)", "",
           f"- written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
           + (f", {elapsed} s into a {args.budget} s budget" if elapsed is not None else ""),
           f"- stages: {args.stages or 'all'}", "",
           "| step | status | exit | seconds | timeout | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['status']} | {r['rc']} | {r['seconds']} | {r['timeout']} | "
                   f"{r['note'].replace('|', '/')} |")
    out.append("")
    out += section_env(work) + section_build(work) + section_tests(work) + section_sanitizer(work)
    out += section_bench(work, "kernels", "Kernels (benchmarks/kernels.py)")
    out += section_bench(work, "step", "Per-step time (benchmarks/step.py, batch 128)")
    out += section_bench(work, "speedup", "Speedup run (benchmarks/speedup.py)")
    out += section_bench(work, "loader", "Folder loader, PIL workers vs decode_jpeg on the GPU (benchmarks/loader.py)")
    bad = [r for r in rows if r["status"] not in ("ok", "SKIP")]
    for r in bad:
        tail = log(work, r["name"])[-TAIL_ON_FAILURE:]
        if tail:
            out += [f"## Last lines of {r['name']} ({r['status']})", ""] + fenced(tail) + [""]
    files = sorted(f for f in os.listdir(args.out) if not f.endswith(".tmp")) if os.path.isdir(args.out) else []
    out += ["## Files", "", "- " + ", ".join(sorted(set(files) | {"summary.md"})),
            "- logs.tar.gz: every step's log, status.tsv, junit.xml, build_info.json, the speedup run's "
            "folder (checkpoints left out)", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="gpu_check.sh's work folder")
    p.add_argument("--out", required=True, help="output folder (summary.md goes there)")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="start time of the run (epoch seconds)")
    p.add_argument("--stages", default="")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    text = render(args)
    tmp = os.path.join(args.out, "summary.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.out, "summary.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
