"""benchmarks/faults.py: its judge fails what docs/reliability.md does not promise, and a two-case run on real
CIFAR-10 passes end to end."""
import json
import os
import subprocess
import sys

from test_cli import DATA, needs_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import faults  # noqa: E402


def _done(code, stderr):
    return subprocess.CompletedProcess([], code, "", stderr)


def test_judge_of_a_refusal():
    good = _done(2, "bip_fast: error: lr: expected a positive number, got nan\n")
    assert faults.judge_refusal(good, "lr", []) == []
    assert faults.judge_refusal(_done(1, good.stderr), "lr", []) == ["exit 1"]
    assert faults.judge_refusal(good, "batch-size", []) == ["message does not name 'batch-size'"]
    two = _done(2, "Traceback (most recent call last):\nValueError: lr\n")
    assert faults.judge_refusal(two, "lr", []) == ["2 stderr lines", "traceback"]
    assert faults.judge_refusal(good, "lr", ["+run/"]) == ["folder changed: ['+run/']"]


def test_snapshot_changes(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("2")
    before = faults.snapshot(tmp_path)
    (tmp_path / "a").write_text("3")
    (tmp_path / "b").unlink()
    (tmp_path / "c").mkdir()
    assert faults.changes(before, faults.snapshot(tmp_path)) == ["+c/", "-b", "~a"]


@needs_data
def test_two_cases_end_to_end(tmp_path):
    out = tmp_path / "faults.json"
    code = faults.main(["--data-dir", DATA, "--work", str(tmp_path / "work"), "--json", str(out),
                        "--only", "^(flag --lr nan|out is a file)$"])
    doc = json.loads(out.read_text())
    assert code == 0 and doc["summary"]["total"] == {"pass": 2, "fail": 0, "skipped": 0}
    assert {c["name"] for c in doc["cases"]} == {"flag --lr nan", "out is a file"}
