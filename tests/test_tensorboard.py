"""``--tensorboard``: TensorBoard's own reader gives back exactly metrics.jsonl (same tags, steps and
values), also after runs killed between their events and their checkpoint and resumed; without the
package the flag is one error line, exit status 2, nothing written, and ``import bip_fast`` works."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from test_cli import QUICK, ROOT, cli, needs_data


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def expected(run):
    """{tag: {step: value}} from metrics.jsonl, mapped independently of bip_fast.engine.tblog: numbers
    under their key, one dict level as key/name, the epoch as the step, nulls and strings left out."""
    want = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                if key != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    want.setdefault(key if sub is None else f"{key}/{sub}", {})[rec["epoch"]] = v
    return want


def read_back(run):
    """{tag: [(step, value), ...]} as TensorBoard's reader (EventAccumulator, which applies purges) gives it."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(run / "tensorboard"), size_guidance={ea_mod.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(run):
    """Counter of (tag, step) over every event written, in every events file (no purging)."""
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    seen = Counter()
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for ev in loader.EventFileLoader(str(path)).Load():
            for v in ev.summary.value:
                seen[(v.tag, ev.step)] += 1
    return seen


def assert_mirrors(run):
    want, got = expected(run), read_back(run)
    assert set(got) == set(want), (sorted(got), sorted(want))
    for tag, series in got.items():
        steps = [s for s, _ in series]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {steps}"
        assert steps == sorted(want[tag]), (tag, steps, sorted(want[tag]))
        for step, value in series:  # TensorBoard stores float32
            assert value == float(np.float32(want[tag][step])), (tag, step, value, want[tag][step])
    return want


@needs_data
def test_events_match_metrics(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run = tmp_path / "imp"
    cli("prune", *QUICK, "--method", "imp", "--sparsity", "0.36", "--rewind-epoch", "0", "--tensorboard",
        "--out", run)
    want = assert_mirrors(run)
    assert {"train_loss", "train_acc", "test_acc", "density", "seconds", "round", "lr/weights"} <= set(want)
    assert sorted(want["round"].values()) == [0, 1, 2]


# A CLI run killed (SIGKILL) inside the checkpoint write of global epoch N, before anything is
# written: that epoch's events are on disk, its checkpoint and metrics line are not.
_KILLED_RUN = r"""
import os, runpy, signal, sys
import bip_fast.files.checkpoint as ckpt

kill_at = int(sys.argv.pop(1))
real = ckpt.save_atomic


def save_atomic(obj, path):
    if isinstance(obj, dict) and obj.get("global_epoch") == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, path)


ckpt.save_atomic = save_atomic
sys.argv[0] = "bip_fast"
runpy.run_module("bip_fast", run_name="__main__", alter_sys=True)
"""


def _killed(kill_at, *args):
    r = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(kill_at), *map(str, args)], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])


@needs_data
def test_resume_after_a_kill_shows_each_step_once(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run = tmp_path / "bip"
    args = ("prune", *QUICK, "--method", "bip", "--sparsity", "0.9", "--pretrain-epochs", "1", "--epochs", "2",
            "--tensorboard", "--out", run)
    _killed(2, *args)  # epochs 1 and 2 in the events, checkpoint of epoch 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    _killed(3, "prune", "--out", run, "--resume")  # replays 2, then 3 in the events, checkpoint of epoch 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    cli("prune", "--out", run, "--resume")  # replays 3
    raw = raw_steps(run)
    assert raw[("train_loss", 2)] == 2 and raw[("train_loss", 3)] == 2 and raw[("train_loss", 1)] == 1, raw
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3
    want = assert_mirrors(run)  # the reader shows each step once, with the value of the session that kept it
    assert sorted(want["train_loss"]) == [1, 2, 3] and "lr/scores" in want
    # a fresh run over the folder (--force) leaves only its own events
    cli("prune", *QUICK, "--method", "bip", "--sparsity", "0.9", "--pretrain-epochs", "1", "--epochs", "1",
        "--tensorboard", "--force", "--out", run)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(assert_mirrors(run)["train_loss"]) == [1, 2]


def test_without_the_package(tmp_path):
    """``import bip_fast`` does not need tensorboard; --tensorboard (flag or --config) is then one
    line, exit 2, and nothing is written."""
    cfg = tmp_path / "tb.yaml"
    cfg.write_text("train:\n  tensorboard: true\n")
    code = ("import sys; sys.modules['tensorboard'] = None\n"  # an import of it fails, as if absent
            "import bip_fast, bip_fast.cli\n"
            "from bip_fast.cli import main\n"
            "assert 'torch.utils.tensorboard' not in sys.modules\n"
            f"rc = [main(['pretrain', '--epochs', '1', '--device', 'cpu', '--out', {str(tmp_path / 'a')!r}, "
            "'--tensorboard']),\n"
            f"      main(['pretrain', '--epochs', '1', '--device', 'cpu', '--out', {str(tmp_path / 'b')!r}, "
            f"'--config', {str(cfg)!r}])]\n"
            "print(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "[2, 2]", (r.stdout, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all(x.startswith("bip_fast: error: tensorboard: ") and "pip install tensorboard" in x
                                   for x in lines), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb.yaml"]
