"""Smoke test of benchmarks/step.py and benchmarks/speedup.py with their smallest settings.

Both scripts run through ``main([...])`` on the CPU: step.py in --quick mode on ResNet-20 with a
tiny batch, speedup.py on a 128-image CIFAR-10 subset, ResNet-8, batch 64, one dense epoch (so every
method takes one or two steps). Checks the output JSON keys and that every method reached the
target sparsities (the IMP series points 48.8%, 73.8%, 86.6%). Needs real CIFAR-10: the folder
named by BIP_FAST_DATA, else /work/shared/data/cifar10 or ./data; skipped when absent.
"""

import json
import os

import pytest

from _script_helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_dir_or_skip():
    d = _data_dir()
    if d is None:
        pytest.skip("CIFAR-10 not available (set BIP_FAST_DATA)")
    return d


def _data_dir():
    for d in (os.environ.get("BIP_FAST_DATA"), "/work/shared/data/cifar10", os.path.join(ROOT, "data")):
        if d and (os.path.isdir(os.path.join(d, "cifar-10-batches-py")) or
                  os.path.isfile(os.path.join(d, "data_batch_1"))):
            return d
    return None


def test_step_quick(tmp_path):
    step = load_script("step")
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
    return load_script("speedup"), out, argv


def test_speedup_tiny(tmp_path, capsys):
    speedup, out, argv = _tiny_speedup(tmp_path, "--arch", "resnet8", "--dense-epochs", "1")
    assert speedup.main(argv) == 0
    doc = json.loads((out / "speedup.json").read_text())
    # the tables can be rebuilt from the file alone; a missing file is one line, status 2
    capsys.readouterr()
    assert speedup.main(["--report-only", "--json", str(out / "speedup.json")]) == 0
    printed = capsys.readouterr().out
    imp86 = next(r for r in doc["rows"] if r["method"] == "imp" and round(r["target_sparsity"], 3) == 0.866)
    assert f"| 86.6% | IMP | {100 * imp86['test_acc']:.2f}" in printed
    assert speedup.main(["--report-only", "--json", str(tmp_path / "absent.json")]) == 2
    for key in ("device", "versions", "commit", "config", "rows", "verdicts", "dense", "complete", "winning_tickets",
                "continue_command", "tuning", "calibration", "control", "provenance"):
        assert key in doc
    # every run of this benchmark was made by the code that wrote the file
    prov = doc["provenance"]
    assert prov["run_commits"] == [prov["commit"]] and prov["commit"] != "unknown"
    # the quick preset is not tuned: each method keeps one configuration, and says so
    assert all(t["configs"] == [] for t in doc["tuning"].values())
    # calibration: a per-step time for every step kind, and the control over the same SGD step
    kinds = doc["calibration"]["s_per_step"]
    assert set(kinds) == {"dense", "hydra_score", "hydra_finetune"} | set(speedup.METHODS) - {"hydra"}
    assert all(v > 0 for v in kinds.values())
    assert set(doc["control"]["s_per_step"]) == {"dense", "imp", "omp"}
    assert doc["control"]["max_rel_diff"] == pytest.approx(max(kinds[k] for k in ("dense", "imp", "omp"))
                                                          / min(kinds[k] for k in ("dense", "imp", "omp")) - 1)
    assert doc["complete"] is True
    assert (out / "time_vs_sparsity.png").is_file() and (out / "accuracy_vs_sparsity.png").is_file()
    rows = doc["rows"]
    targets = sorted({r["target_sparsity"] for r in rows})
    assert [round(t, 3) for t in targets] == [0.488, 0.738, 0.866]
    assert {r["method"] for r in rows} == set(speedup.METHODS)
    for r in rows:
        for key in ("method", "schedule", "target_sparsity", "sparsity", "test_acc", "train_seconds"):
            assert key in r
        # every method is global here (Hydra too) and hits the global count exactly
        assert abs(r["sparsity"] - r["target_sparsity"]) <= 1e-4, r
        assert r["structure"] == "global"
        assert r["train_seconds"] > 0 and 0.0 <= r["test_acc"] <= 1.0
        if r["method"] != "imp":
            # evaluated along the schedule (here only at its end); cost to IMP's accuracy or the gap
            assert [p["step"] for p in r["curve"]] == [r["curve"][-1]["step"]] and r["curve"][-1]["step"] > 0
            assert (r["steps_to_imp_accuracy"] is None) == (r["gap_to_imp_accuracy"] is not None)
            # the calibrated cost is per-step seconds x steps
            assert r["cost_seconds"] > 0

    # Resume: a rerun with --resume finds every run finished and trains nothing.
    assert speedup.main(argv + ["--resume"]) == 0
    doc2 = json.loads((out / "speedup.json").read_text())
    assert [r["train_seconds"] for r in doc2["rows"]] == [r["train_seconds"] for r in rows]

    # A run made by another commit is refused by --resume unless mixing is asked for, and then named.
    run = sorted((out / "runs").glob("omp-*.json"))[0]
    rec = json.loads(run.read_text())
    rec["code"] = {"commit": "0000000", "dirty": False}
    run.write_text(json.dumps(rec))
    assert speedup.main(argv + ["--resume"]) == 2
    assert speedup.main(argv + ["--resume", "--allow-mixed-commits"]) == 0
    doc3 = json.loads((out / "speedup.json").read_text())
    assert doc3["provenance"]["run_commits"] == sorted(["0000000", prov["commit"]])


def test_speedup_cpu_preset_convergence_and_curves(tmp_path):
    """The cpu preset's path: unaugmented data, the 1.5x dense run of the convergence check, curves."""
    speedup, out, argv = _tiny_speedup(tmp_path, "--preset", "cpu", "--dense-epochs", "4", "--seeds", "2",
                                       "--methods", "bip_fused", "--val", "500", "--target-rounds", "3,6")
    assert speedup.main(argv) == 0
    doc = json.loads((out / "speedup.json").read_text())
    # a class-balanced validation split held out of the training images decides; the test set reports
    val = doc["validation"]
    assert val["images"] == 500 and val["per_class"] == [50] * 10 and val["disjoint_from_train"] is True
    conv = doc["dense"]["convergence"]
    assert conv["decided_on"] == "val_acc"
    assert conv["longer_training_factor"] == 1.5 and conv["long_runs"][0]["steps"] == 12  # 1.5 x 4 epochs x 2 steps
    assert len(conv["longer_training_gain_per_seed"]) == 2 == len(doc["dense"]["acc_per_seed"])
    assert len(conv["dense_curves"][0]["curve"]) == 8  # the preset's eval_points
    assert doc["config"]["augment"] is False
    # IMP is tuned (bip_fused alone has no grid: it takes BiP (alternating)'s choice, absent here)
    imp = doc["tuning"]["imp"]
    assert len(imp["configs"]) == 4 and all(0.0 <= c["val_acc"] <= 1.0 for c in imp["configs"])
    best = max(imp["configs"], key=lambda c: c["val_acc"])
    assert imp["chosen"] in [c["config"] for c in imp["configs"]] and best["val_acc"] == max(
        c["val_acc"] for c in imp["configs"] if c["config"] == imp["chosen"])
    rows = [r for r in doc["rows"] if r["method"] == "bip_fused"]
    assert len(rows) == 2 and doc["config"]["target_rounds"] == [3, 6]
    imp_rows = [r for r in doc["rows"] if r["method"] == "imp"]
    for r in rows:
        assert [p["step"] for p in r["curve"]] == [1, 2, 3, 4, 5]  # 5 BiP steps (100/160 of 8), 8 evaluation points
        assert all(0.0 <= p["val_acc"] <= 1.0 and 0.0 <= p["test_acc"] <= 1.0 for p in r["curve"])
        times = [p["train_seconds"] for p in r["curve"]]
        assert times == sorted(times) and times[-1] == pytest.approx(r["train_seconds"])
        costs = [p["cost_seconds"] for p in r["curve"]]
        assert costs == sorted(costs)
        # the crossing is read on validation against IMP's mean validation accuracy (no minus std)
        imp_row = next(x for x in imp_rows if x["target_sparsity"] == r["target_sparsity"])
        assert r["decided_on"] == "val_acc" and r["imp_accuracy_threshold"] == imp_row["val_acc"]
        hit = next((i for i, p in enumerate(r["curve"]) if p["val_acc"] >= imp_row["val_acc"]), None)
        # the crossing is interpolated between the last point below and the first point at or above
        if hit is None:
            assert r["steps_to_imp_accuracy"] is None
        else:
            lo = r["curve"][hit - 1]["step"] if hit else r["curve"][0]["step"]
            assert lo <= r["steps_to_imp_accuracy"] <= r["curve"][hit]["step"]
        # paired per seed against IMP and against the same seed's dense model
        for key in ("paired_vs_imp", "paired_vs_dense"):
            pv = r[key]
            assert pv["n"] == 2 and len(pv["ci95"]) == 2 and pv["ci95"][0] <= pv["mean"] <= pv["ci95"][1]
            assert 0 <= pv["positive"] <= 2
    assert set(doc["winning_ticket"]) == {"imp", "bip_fused"}
    assert (out / "accuracy_vs_time.png").is_file()
