"""Smoke test of benchmarks/filter_deficit.py in --quick mode (256 CIFAR-10 images, one seed, one
dense epoch): the score-gradient measurement (a pruned filter's score gradient against a kept
one's), every variant's run with its mask movement, the paired rows against BiP, the JSON and the
table, and that --resume trains nothing again. Needs real CIFAR-10 (skipped when absent)."""

import json

from _script_helpers import load_script
from test_speedup_smoke import _data_dir_or_skip


def test_filter_deficit_quick(tmp_path):
    data_dir = _data_dir_or_skip()
    out = tmp_path / "out"
    argv = ["--quick", "--data-dir", data_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--variants", "bip,bip_freeze50,bip_bn_corrected,bip_unit_scores,l1,l1_lr0.2,l1_bip_steps"]
    fd = load_script("filter_deficit")
    assert fd.main(argv) == 0
    doc = json.loads((out / "filter_deficit.json").read_text())
    assert doc["complete"] is True and doc["provenance"]["commit"]
    assert "--variants bip,bip_freeze50" in doc["continue_command"] and f"--out {out}" in doc["continue_command"]
    rows = {r["variant"]: r for r in doc["summary"]}
    assert set(rows) == {"bip", "bip_freeze50", "bip_bn_corrected", "bip_unit_scores", "l1", "l1_lr0.2", "l1_bip_steps"}
    # the control retrains for BiP's steps and is never chosen
    assert doc["runs"]["l1_bip_steps"][0]["steps"] == doc["runs"]["bip"][0]["steps"] != doc["runs"]["l1"][0]["steps"]
    v = doc["verdict"]
    best = max((r for r in rows.values() if r["method"] == "bip_filter"), key=lambda r: r["val_acc"])
    assert v["bip_choice"] in ("bip", "bip_freeze50", "bip_bn_corrected", "bip_unit_scores") and v["l1_choice"] in ("l1", "l1_lr0.2")
    assert rows[v["bip_choice"]]["val_acc"] == best["val_acc"]
    assert v["paired_base_bip_vs_l1"]["n"] == 1
    assert v["paired_l1_bip_steps_vs_l1"]["n"] == 1 and "chosen BiP - L1-norm retrained" in (out / "filter_deficit.md").read_text()
    for v, r in rows.items():
        assert r["seeds"] == [0] and 0.0 <= r["val_acc"] <= 1.0
        assert abs(r["filter_sparsity"] - 0.8) <= 0.01
        assert (r["paired_test_vs_bip"] is None) == (v == "bip")
    assert rows["bip_freeze50"]["hparams"]["mask_freeze"] == 0.5
    assert rows["bip_unit_scores"]["hparams"]["unit_scores"] is True
    assert "(4 BiP, 2 L1-norm)" in doc["verdict"]["rule"]  # the control is not a try
    # a frozen mask does not move in the second half; OMP-style L1 pruning never moves
    assert rows["bip_freeze50"]["flips_per_tenth"][-1] == 0.0
    assert all(f == 0.0 for f in rows["l1"]["flips_per_tenth"])
    layers = doc["grad_ratios"][0]["layers"]
    assert layers and all(L["kept"] < L["filters"] for L in layers)
    # where a pruned filter gets any gradient at all, BatchNorm's eps makes it larger than a kept one's
    assert max(L["ratio"] for L in layers if L["ratio"] is not None) > 1.0
    assert "| bip_freeze50 |" in (out / "filter_deficit.md").read_text()
    mtime = {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()}
    assert fd.main(argv + ["--resume"]) == 0  # nothing trains again
    assert {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()} == mtime

