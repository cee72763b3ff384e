"""Write the measured tables of README.md and docs/*.md from the committed results files.

A generated block in a markdown file is delimited by two HTML comments; the opening one names the
renderer and the results file (relative to the repository root):

    <!-- render speedup benchmarks/results/speedup-cpu-cpu/speedup.json -->
    ... everything here is rewritten ...
    <!-- /render -->

Renderers (each a pure function of the JSON file; the tables are the benchmark's own):

- ``speedup``: where the file comes from, the headline table (test accuracy, paired difference to
  IMP and to dense with 95% intervals and verdicts, calibrated cost, speedup at IMP's validation
  accuracy with its 90% interval), the sparsest winning tickets and the control row;
- ``speedup-table``: every column of ``benchmarks/speedup.py``'s table; ``speedup-tuning``: its grid;
- ``speedup-pairs``: one method (``ref=``, default BiP alternating) against each of the others per
  target, paired per seed (test accuracy points, 95% interval, seeds positive, verdict), computed
  from the rows' per-seed accuracies with ``_speedup_stats.paired``;
- ``structured``: where the file comes from, ``benchmarks/structured.py``'s table and, where the
  file has them, the mask flips per tenth of training;
- ``structured-pairs``: the same paired table for ``benchmarks/structured.py``'s file (``ref=``,
  default BiP with per-layer filter masks; every method starts from the same seed's dense model).

Options after the path: ``methods=a,b`` (speedup, speedup-pairs, structured-pairs: the methods to
show), ``ref=m`` (speedup-pairs, structured-pairs).

    python benchmarks/render_docs.py            # rewrite every block of README.md and docs/*.md
    python benchmarks/render_docs.py --check    # exit 1 naming every block that differs from its file

``tests/test_render_docs.py`` runs the check, so a number in a generated block cannot drift from
the file it is read from."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

try:  # imported as part of a package (python -m benchmarks.render_docs)
    from . import _speedup_tables as T
    from ._speedup_report import label
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _speedup_tables as T  # type: ignore[no-redef]
    from _speedup_report import label  # type: ignore[no-redef]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN = re.compile(r"^<!-- render (?P<spec>[^>]*?) -->\s*$")
CLOSE = "<!-- /render -->"


class RenderError(ValueError):
    """A block that cannot be rendered: names the markdown file and line."""


# ------------------------------------------------------------------------------------------------
def _origin(d: Dict[str, Any], path: str) -> str:
    """One line: the file, device, torch, the commit(s) its runs were made at, and whether it is complete."""
    env = d.get("env") or {}
    prov = d.get("provenance") or {}
    commits = prov.get("run_commits") or [prov.get("commit") or d.get("commit") or "unknown"]
    clean = "" if not prov.get("runs_dirty", prov.get("dirty")) else " (some runs from a dirty tree)"
    cpu = f", {env['cpu_count']} vCPUs" if env.get("device") == "cpu" and env.get("cpu_count") else ""
    line = (f"`{os.path.relpath(path, ROOT)}`: {env.get('device_name', d.get('device', '?'))}{cpu}, "
            f"torch {env.get('torch', '?')}, runs made at commit {', '.join(commits)}{clean}")
    if d.get("complete") is False:
        # the recorded command repeats the last invocation's budget, which says nothing of what is left
        again = re.sub(r"--max-minutes \S+", "--max-minutes N", d.get("continue_command", "--resume"))
        line += f"; **partial** (stopped in {d.get('stopped_in') or '?'}; continue with `{again}`)"
    return line + "."


def _speedup_config(d: Dict[str, Any]) -> str:
    c = d["config"]
    val = d.get("validation") or {}
    parts = [f"{c['arch']}, CIFAR-10 {c['train_samples']:,} training images",
             f"validation split {val['images']:,} images" if val.get("images") else "no validation split",
             f"test {c['test_samples']:,} images", f"seeds 0-{c['seeds'] - 1}",
             f"{c.get('eval_points', '?')} evaluation points per run",
             f"schedules x{c.get('schedule_factor', 0):.4g} of the paper's"]
    return "; ".join(parts) + "."


def _methods(d: Dict[str, Any], opts: Dict[str, str]) -> List[str]:
    have = list(d["config"].get("methods") or [])
    want = opts["methods"].split(",") if "methods" in opts else have
    unknown = [m for m in want if m not in have]
    if unknown:
        raise RenderError(f"methods {unknown} are not in the file (it has {have})")
    return want


def speedup(d: Dict[str, Any], path: str, opts: Dict[str, str]) -> str:
    methods = _methods(d, opts)
    ran = [m for m in methods if any(r["method"] == m for r in d["rows"])]
    out = [_origin(d, path), _speedup_config(d), ""]
    if not d.get("calibration"):
        out += ["No calibrated cost yet (it is measured at the end of the run): the speedups below use "
                "the wall clock of the runs.", ""]
    out += [T.headline_table(d["rows"], ran), ""]
    missing = [label(m) for m in methods if m not in ran]
    if missing:
        out += [f"Not run yet: {', '.join(missing)}.", ""]
    tickets = {m: t for m, t in (d.get("winning_tickets") or {}).items() if m in ran}
    if tickets:
        out += [T.tickets_table(tickets, d["dense"]["acc"]), ""]
    ctrl = T.control_line(d.get("control") or {})
    return "\n".join(out + ([ctrl[0].upper() + ctrl[1:] + "."] if ctrl else [])).rstrip()


def speedup_table(d: Dict[str, Any], path: str, opts: Dict[str, str]) -> str:
    return "\n".join([_origin(d, path), "", T.table(d["rows"], d["dense"])])


def speedup_tuning(d: Dict[str, Any], path: str, opts: Dict[str, str]) -> str:
    return "\n".join([_origin(d, path), "", T.tuning_table(d["tuning"])])


def _pairs(d: Dict[str, Any], path: str, opts: Dict[str, str], default_ref: str) -> str:
    """``ref`` against every other method of ``methods`` that has rows, paired per seed, named as
    the file's rows name them (where they do)."""
    ref = _methods(d, {"methods": opts.get("ref", default_ref)})[0]
    others = [m for m in _methods(d, opts) if m != ref and any(r["method"] == m for r in d["rows"])]
    labels = {r["method"]: r["label"] for r in d["rows"] if r.get("label")}
    return "\n".join([_origin(d, path), "", T.pairs_table(d["rows"], ref, others, labels)])


def speedup_pairs(d: Dict[str, Any], path: str, opts: Dict[str, str]) -> str:
    return _pairs(d, path, opts, "bip_alternating")


def structured_pairs(d: Dict[str, Any], path: str, opts: Dict[str, str]) -> str:
    return _pairs(d, path, opts, "bip_filter")  # BiP with per-layer filter masks


def _flips_table(flips: Dict[str, Any], labels: Dict[str, str]) -> str:
    tenths = max((len(v["filters"]) for per in flips.values() for v in per.values()), default=0)
    if not tenths:
        return ""
    head = ["method", "target", "runs"] + [f"{i + 1}/{tenths}" for i in range(tenths)]
    lines = ["Output filters whose kept state changed in each tenth of training (% of filters, mean over runs):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m, per in flips.items():
        for t, v in per.items():
            tgt = t if t == "all targets" else f"{100 * float(t):.0f}%"
            cells = [f"{100 * x:.1f}" for x in v["filters"]] + [""] * (tenths - len(v["filters"]))
            lines.append("| " + " | ".join([labels.get(m, m), tgt, str(v["runs"])] + cells) + " |")
    return "\n".join(lines)


def structured(d: Dict[str, Any], path: str, opts: Dict[str, str]) -> str:
    try:
        from . import _structured_report as S
    except ImportError:
        import _structured_report as S  # type: ignore[no-redef]
    c = d["config"]
    out = [_origin(d, path),
           f"{c['arch']}, CIFAR-10 {c['train_samples']:,} training / {c['val_samples']:,} validation / "
           f"{c['test_samples']:,} test images, seeds 0-{c['seeds'] - 1}, latency with "
           f"{c['latency']['threads']} CPU thread(s).", "",
           S.table(d["rows"], d["dense"], c["latency"]["batches"])]
    flips = _flips_table(d.get("mask_flips") or {}, {r["method"]: r["label"] for r in d["rows"]})
    if flips:
        out += ["", flips]
    return "\n".join(out)


RENDERERS: Dict[str, Callable[[Dict[str, Any], str, Dict[str, str]], str]] = {
    "speedup": speedup, "speedup-table": speedup_table, "speedup-tuning": speedup_tuning,
    "speedup-pairs": speedup_pairs, "structured": structured, "structured-pairs": structured_pairs}


# ------------------------------------------------------------------------------------------------
def _parse(spec: str, where: str) -> Tuple[str, str, Dict[str, str]]:
    words = spec.split()
    if len(words) < 2:
        raise RenderError(f"{where}: a render block needs a renderer and a results file, got {spec!r}")
    name, rel, rest = words[0], words[1], words[2:]
    if name not in RENDERERS:
        raise RenderError(f"{where}: unknown renderer {name!r} (known: {', '.join(sorted(RENDERERS))})")
    opts = {}
    for w in rest:
        if "=" not in w:
            raise RenderError(f"{where}: option {w!r} is not key=value")
        k, v = w.split("=", 1)
        opts[k] = v
    return name, rel, opts


def _load(rel: str, where: str, root: str) -> Tuple[Dict[str, Any], str]:
    path = os.path.join(root, rel)
    try:
        with open(path) as f:
            return json.load(f), path
    except FileNotFoundError:
        raise RenderError(f"{where}: results file {rel} does not exist") from None
    except json.JSONDecodeError as e:
        raise RenderError(f"{where}: results file {rel} is not valid JSON ({e})") from None


def render_text(text: str, name: str, root: str = ROOT) -> Tuple[str, List[str]]:
    """``text`` with every block rewritten, and the specs of the blocks whose content changed."""
    lines = text.split("\n")
    out: List[str] = []
    changed: List[str] = []
    i = 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        where = f"{name}:{i}"
        j = i
        while j < len(lines) and lines[j].strip() != CLOSE:
            if OPEN.match(lines[j]):
                raise RenderError(f"{where}: render block opened again at line {j + 1} before {CLOSE}")
            j += 1
        if j == len(lines):
            raise RenderError(f"{where}: render block is never closed ({CLOSE})")
        kind, rel, opts = _parse(m.group("spec"), where)
        d, path = _load(rel, where, root)
        try:
            body = RENDERERS[kind](d, path, opts).split("\n")
        except (KeyError, TypeError) as e:
            raise RenderError(f"{where}: {rel} lacks what the {kind!r} renderer reads "
                              f"({type(e).__name__}: {e})") from None
        if lines[i:j] != body:
            changed.append(f"{where} ({kind} {rel})")
        out.extend(body)
        out.append(lines[j])
        i = j + 1
    return "\n".join(out), changed


def documents(root: str = ROOT) -> List[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def run(paths: Sequence[str], check: bool, root: str = ROOT) -> List[str]:
    """Render (or, with ``check``, only compare) every block of ``paths``; the changed blocks."""
    changed: List[str] = []
    for p in paths:
        with open(p) as f:
            text = f.read()
        new, ch = render_text(text, os.path.relpath(p, root), root)
        changed += ch
        if ch and not check:
            tmp = p + ".render-tmp"
            with open(tmp, "w") as f:
                f.write(new)
            os.replace(tmp, p)
    return changed


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its file")
    ap.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    args = ap.parse_args(argv)
    try:
        changed = run(args.files or documents(), args.check)
    except RenderError as e:
        print(f"render_docs: {e}", file=sys.stderr)
        return 2
    for c in changed:
        print(("stale: " if args.check else "rewrote: ") + c)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
