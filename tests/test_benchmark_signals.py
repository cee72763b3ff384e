"""SIGINT / SIGTERM stop a resumable benchmark the way --max-minutes does: the epoch in progress
finishes, its checkpoint is saved, the results file is written (``complete`` false, ``stopped_in``
naming the run), the exit status is 128 + the signal, and ``--resume`` continues to a complete file.
A second signal interrupts at once; the previous handlers come back afterwards."""

import json
import os
import signal
import sys
import types

import pytest
import torch

from test_speedup_smoke import _tiny_speedup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _speedup_loop as L  # noqa: E402


def _ctx(tmp_path):
    args = types.SimpleNamespace(out=str(tmp_path), max_minutes=None)
    return L.Ctx(args, {"train_samples": 128, "batch_size": 64, "dense_epochs": 1}, torch.device("cpu"), None)


def test_first_signal_stops_softly_second_interrupts(tmp_path):
    ctx = _ctx(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert not ctx.out_of_time() and ctx.exit_status() == 0
    with pytest.raises(KeyboardInterrupt):
        with L.stop_on_signals(ctx):
            signal.raise_signal(signal.SIGTERM)  # soft: only recorded
            assert ctx.signalled == signal.SIGTERM and ctx.out_of_time()
            signal.raise_signal(signal.SIGINT)  # the second one interrupts
    assert ctx.stop_reason() == "stopped by SIGTERM"
    assert ctx.exit_status() == 128 + signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


def test_max_minutes_reason(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.args.max_minutes, ctx.deadline = 0.5, 0.0
    assert ctx.out_of_time() and ctx.stop_reason() == "stopped after --max-minutes 0.5" and ctx.exit_status() == 0


def test_sigterm_during_training_writes_results_and_resumes(tmp_path, monkeypatch):
    speedup, out, argv = _tiny_speedup(tmp_path, "--arch", "resnet8", "--dense-epochs", "1", "--methods", "omp")
    loop = sys.modules["_speedup_loop"]  # the copy the benchmark imported
    timed = loop._timed_steps
    calls = []

    def signalled_once(*a, **k):
        if not calls:
            signal.raise_signal(signal.SIGTERM)
        calls.append(1)
        return timed(*a, **k)

    monkeypatch.setattr(loop, "_timed_steps", signalled_once)
    before = signal.getsignal(signal.SIGTERM)
    assert speedup.main(argv) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    doc = json.loads((out / "speedup.json").read_text())
    assert doc["complete"] is False and doc["stopped_in"]
    assert list((out / "ckpt").glob("*.pt")), "the stopped run's checkpoint is kept"
    monkeypatch.setattr(loop, "_timed_steps", timed)
    assert speedup.main(argv + ["--resume"]) == 0
    doc = json.loads((out / "speedup.json").read_text())
    assert doc["complete"] is True and doc["stopped_in"] is None
    assert {r["method"] for r in doc["rows"]} == {"imp", "omp"}
