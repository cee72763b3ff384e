"""Smoke test of benchmarks/structured.py in --quick mode (a 256-image CIFAR-10 subset, one seed,
one dense epoch of 4 steps; about a minute on one CPU thread).

Checks the rows (every method at 20/50/80% filter sparsity, per-layer filter masks at the target,
every model compacted, group masks cheaper than dense in MACs), the grid tuning on the validation split, the
table, plot and JSON, that --resume trains nothing again, and the --tune speedup path. Needs real
CIFAR-10: the folder named by BIP_FAST_DATA, else /work/shared/data/cifar10 or ./data; skipped
when absent.
"""

import json

import pytest

from _script_helpers import load_script
from test_speedup_smoke import _data_dir


def _argv(tmp_path, out, *flags):
    data_dir = _data_dir()
    if data_dir is None:
        pytest.skip("CIFAR-10 not available (set BIP_FAST_DATA)")
    return ["--quick", "--data-dir", data_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--threads", "1", *flags]


def test_structured_quick(tmp_path):
    out = tmp_path / "out"
    argv = _argv(tmp_path, out)
    structured = load_script("structured")
    assert structured.main(argv) == 0
    doc = json.loads((out / "structured.json").read_text())
    for key in ("config", "rows", "dense", "tuning", "records", "provenance", "complete", "continue_command"):
        assert key in doc
    assert doc["complete"] is True
    assert (out / "accuracy_vs_latency.png").is_file() and (out / "structured.md").is_file()
    methods = list(structured.DEFAULT_METHODS)
    rows = doc["rows"]
    assert [(r["method"], r["target_sparsity"]) for r in rows] == [(m, s) for m in methods for s in (0.2, 0.5, 0.8)]
    dense = doc["dense"]["cost"]
    for r in rows:
        assert r["seeds"] == [0] and 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert set(r["latency_ms"]) == {"1", "16"} and all(v > 0 for v in r["latency_ms"].values())
        if r["structure"] == "group":
            # compacted: physically smaller than dense, and the masks removed what they say
            assert r["removable"] and r["macs"] < dense["macs"] and r["params"] < dense["params"]
            # nonzero parameters once the masks are baked in: a removed channel's bias and BatchNorm
            # entries are zero too, so the compacted model holds at least as many
            assert 0 < r["nonzero_params"] <= r["params"]
        else:
            # per-layer filter masks: compacted too, as far as their coupled groups allow (the rest
            # stays as zeros), the classifier stays dense
            assert r["compacted"] and r["macs"] <= dense["macs"] and r["params"] <= dense["params"]
            assert 0.0 <= r["zero_filters_cut"] <= 1.0
            tol = 0.03 if r["method"] == "imp_filter" else 0.01  # IMP-F rounds per layer in every round
            assert abs(r["filter_sparsity"] - r["target_sparsity"]) <= tol, r
            assert r["nonzero_params"] < dense["params"]
        # paired per seed against the same seed's dense model (one seed: no interval)
        assert r["paired_vs_dense"]["n"] == 1 and r["paired_vs_dense"]["ci95"] is None
        assert ("paired_vs_imp" in r) == (r["method"] not in ("imp_filter", "imp_group"))
    # how the masks move: per method and target, the share of filters flipping in each tenth
    flips = doc["mask_flips"]
    assert set(flips) == set(methods)
    for m in methods:
        keys = ["all targets"] if m == "imp_filter" else ["0.2", "0.5", "0.8"]
        assert sorted(flips[m]) == keys
        for f in flips[m].values():
            # tenths of the schedule; a schedule of fewer than 10 steps has one part per step
            assert 1 <= len(f["filters"]) == len(f["entries"]) <= 10
            assert all(0.0 <= x <= 1.0 for x in f["filters"] + f["entries"])
    # OMP and L1-norm pruning fix the mask once: nothing flips after the first step
    assert all(x == 0.0 for f in flips["omp_filter"].values() for x in f["filters"])
    # tuning: every method ran its grid at 50% on seed 0 and kept the best validation accuracy
    for m in methods:
        t = doc["tuning"][m]
        assert t["source"] == "grid" and len(t["configs"]) == 4 and t["target_sparsity"] == 0.5
        best = max(c["val_acc"] for c in t["configs"])
        assert any(c["config"] == t["chosen"] and c["val_acc"] == best for c in t["configs"])
    md = (out / "structured.md").read_text()
    assert "not removable" not in md and "per layer, compacted (" in md and "group, compacted" in md
    for rec in [x for rs in doc["records"].values() for x in rs]:  # the interleaved timing's control
        inf = rec["inference"]
        assert set(inf["control_rel_diff"]) == {"1", "16"} and set(inf["masked_latency_ms"]) == {"1", "16"}

    # --resume: every run is finished, nothing trains again
    assert structured.main(argv + ["--resume"]) == 0
    doc2 = json.loads((out / "structured.json").read_text())
    assert [r["train_seconds"] for r in doc2["rows"]] == [r["train_seconds"] for r in rows]
    assert [r["test_acc"] for r in doc2["rows"]] == [r["test_acc"] for r in rows]


def test_structured_tuned_from_speedup(tmp_path):
    structured = load_script("structured")
    src = tmp_path / "speedup.json"
    src.write_text(json.dumps({"rows": []}))
    argv = _argv(tmp_path, tmp_path / "out", "--methods", "l1_filter", "--sparsities", "0.5", "--tune", "speedup",
                 "--tuned-from", str(src))
    assert structured.main(argv) == 2  # no tuning in that file: refused, not silently untuned
    src.write_text(json.dumps({"tuning": {"omp": {"chosen": {"lr": 0.03, "weight_decay": 1e-4}}}}))
    assert structured.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "structured.json").read_text())
    t = doc["tuning"]["l1_filter"]
    assert "speedup.py's choice for omp" in t["source"] and t["chosen"] == {"lr": 0.03, "weight_decay": 1e-4}
    (row,) = doc["rows"]
    assert row["method"] == "l1_filter" and row["target_sparsity"] == 0.5
    rec = doc["records"]["l1_filter"][0]
    assert rec["hparams"]["lr"] == 0.03 and rec["hparams"]["weight_decay"] == 1e-4
