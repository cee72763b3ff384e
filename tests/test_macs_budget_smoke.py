"""Smoke test of benchmarks/macs_budget.py in --quick mode (256 CIFAR-10 images, one seed, one
dense epoch): uniform group sparsity, the MACs budget and Torch-Pruning's magnitude pruner land
at (at most, and close to) the requested MACs, every row is tuned on the validation split and
timed against dense with a control, paired rows, JSON and table; --resume trains nothing again.
Needs real CIFAR-10 (skipped when absent)."""

import json

from _script_helpers import load_script
from test_speedup_smoke import _data_dir_or_skip


def test_macs_budget_quick(tmp_path):
    data_dir = _data_dir_or_skip()
    out = tmp_path / "out"
    argv = ["--quick", "--data-dir", data_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--threads", "1", "--targets", "0.5", "--methods", "omp_uniform,omp_macs,tp_magnitude"]
    mb = load_script("macs_budget")
    assert mb.main(argv) == 0
    doc = json.loads((out / "macs_budget.json").read_text())
    assert doc["complete"] is True and doc["config"]["arch"] == "resnet8b"
    rows = {r["method"]: r for r in doc["summary"]}
    assert set(rows) == {"omp_uniform", "omp_macs", "tp_magnitude"}
    for m, r in rows.items():
        assert 0.45 <= r["macs_ratio"] <= 0.5, (m, r["macs_ratio"])  # at most the budget, within 10%
        assert set(r["latency_ms"]) == {"1", "16"} and all(v > 0 for v in r["latency_ms"].values())
        assert set(r["control_rel_diff"]) == {"1", "16"}
        assert set(doc["tuning"][m]["chosen_hparams"]) >= {"lr", "weight_decay"}
        assert len(doc["tuning"][m]["configs"]) == 4
    assert rows["omp_macs"]["paired_vs_uniform"]["n"] == 1
    assert "paired_vs_tp" in rows["omp_uniform"] and "paired_vs_tp" not in rows["tp_magnitude"]
    assert 0.0 < doc["config"]["uniform_sparsity"]["0.5"] < 1.0
    assert "| 0.5 | omp_macs |" in (out / "macs_budget.md").read_text()
    assert "--targets 0.5 --methods omp_uniform,omp_macs,tp_magnitude" in doc["continue_command"]
    mtime = {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()}
    assert mb.main(argv + ["--resume"]) == 0
    assert {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()} == mtime
