"""Smoke test of benchmarks/step.py and benchmarks/speedup.py with their smallest settings.

Both scripts run through ``main([...])`` on the CPU: step.py in --quick mode on ResNet-20 with a
tiny batch, speedup.py on a 128-image CIFAR-10 subset, ResNet-8, batch 64, one dense epoch (so every
method takes one or two steps). Checks the output JSON keys and that every method reached the
target sparsities (the IMP series points 48.8%, 73.8%, 86.6%). Needs real CIFAR-10: the folder
named by BIP_FAST_DATA, else /work/shared/data/cifar10 or ./data; skipped when absent.
"""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bip_fast_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _data_dir():
    for d in (os.environ.get("BIP_FAST_DATA"), "/work/shared/data/cifar10", os.path.join(ROOT, "data")):
        if d and (os.path.isdir(os.path.join(d, "cifar-10-batches-py")) or
                  os.path.isfile(os.path.join(d, "data_batch_1"))):
            return d
    return None


def test_step_quick(tmp_path):
    step = _load("step")
    path = tmp_path / "step.json"
    rc = step.main(["--quick", "--device", "cpu", "--batch-size", "8", "--repeats", "3", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    for key in ("benchmark", "device", "versions", "commit", "config", "rows"):
        assert key in doc
    modes = {r["mode"] for r in doc["rows"]}
    assert modes == set(step.MODES)
    for r in doc["rows"]:
        for key in ("model", "device", "mode", "ms_per_iter", "p20", "p80", "ratio_to_dense",
                    "ratio_to_authors_shaped"):
            assert key in r
        assert r["p20"] <= r["ms_per_iter"] <= r["p80"]
        assert r["ms_per_iter"] > 0


def _tiny_speedup(tmp_path, *flags):
    """speedup.py on 128 training / 100 test images at batch 64 (skipped without CIFAR-10)."""
    data_dir = _data_dir()
    if data_dir is None:
        pytest.skip("CIFAR-10 not available (set BIP_FAST_DATA)")
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--data-dir", data_dir, "--train-subset", "128", "--batch-size", "64",
            "--test-subset", "100", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *flags]
    return _load("speedup"), out, argv


def test_speedup_tiny(tmp_path):
    speedup, out, argv = _tiny_speedup(tmp_path, "--arch", "resnet8", "--dense-epochs", "1")
    assert speedup.main(argv) == 0
    doc = json.loads((out / "speedup.json").read_text())
    for key in ("device", "versions", "commit", "config", "rows", "verdicts", "dense", "complete", "winning_tickets",
                "continue_command"):
        assert key in doc
    assert doc["complete"] is True
    assert (out / "time_vs_sparsity.png").is_file() and (out / "accuracy_vs_sparsity.png").is_file()
    rows = doc["rows"]
    targets = sorted({r["target_sparsity"] for r in rows})
    assert [round(t, 3) for t in targets] == [0.488, 0.738, 0.866]
    assert {r["method"] for r in rows} == set(speedup.METHODS)
    for r in rows:
        for key in ("method", "schedule", "target_sparsity", "sparsity", "test_acc", "train_seconds"):
            assert key in r
        # Hydra prunes layer-wise (per-layer rounding); everything else hits the global count exactly.
        tol = 2e-3 if r["method"] == "hydra" else 1e-4
        assert abs(r["sparsity"] - r["target_sparsity"]) <= tol, r
        assert r["train_seconds"] > 0 and 0.0 <= r["test_acc"] <= 1.0
        if r["method"] != "imp":
            # evaluated along the schedule (here only at its end); time to IMP's accuracy or the gap
            assert r["curve"] and r["curve"][-1]["test_acc"] == r["test_acc"]
            assert (r["seconds_to_imp_accuracy"] is None) == (r["gap_to_imp_accuracy"] is not None)

    # Resume: a rerun with --resume finds every run finished and trains nothing.
    assert speedup.main(argv + ["--resume"]) == 0
    doc2 = json.loads((out / "speedup.json").read_text())
    assert [r["train_seconds"] for r in doc2["rows"]] == [r["train_seconds"] for r in rows]


def test_speedup_cpu_preset_convergence_and_curves(tmp_path):
    """The cpu preset's path: unaugmented data, the 1.5x dense run of the convergence check, curves."""
    speedup, out, argv = _tiny_speedup(tmp_path, "--preset", "cpu", "--dense-epochs", "4", "--seeds", "1",
                                       "--methods", "bip_fused")
    assert speedup.main(argv) == 0
    doc = json.loads((out / "speedup.json").read_text())
    conv = doc["dense"]["convergence"]
    assert doc["dense"]["converged"] is conv["converged"]
    assert conv["longer_training_factor"] == 1.5 and conv["long_runs"][0]["steps"] == 12  # 1.5 x 4 epochs x 2 steps
    assert len(conv["dense_curves"][0]["curve"]) == 4  # the preset's eval_points
    assert doc["config"]["augment"] is False
    rows = [r for r in doc["rows"] if r["method"] == "bip_fused"]
    assert len(rows) == 3
    for r in rows:
        assert [p["step"] for p in r["curve"]] == [1, 2, 4, 5]  # 5 BiP steps (100/160 of 8), 4 evaluations
        times = [p["train_seconds"] for p in r["curve"]]
        assert times == sorted(times) and times[-1] == pytest.approx(r["train_seconds"])
    assert (out / "accuracy_vs_time.png").is_file()
