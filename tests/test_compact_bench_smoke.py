"""Smoke test of benchmarks/compact.py: the --quick run (ResNet-20, tiny training and timing) and
its JSON (rows with their masks, the interleaved protocol, the control), and the interleaved timing
protocol itself on fake chunks."""
import json

from _script_helpers import load_script
from test_speedup_smoke import _data_dir


def test_quick_run_writes_rows_and_checkpoint(tmp_path):
    path = tmp_path / "compact.json"
    data = _data_dir()
    argv = ["--quick", "--threads", "1", "--json", str(path)] + (["--data-dir", data] if data else ["--no-bip"])
    assert load_script("compact").main(argv) == 0
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "compact" and doc["rows"] and doc["commit"]
    assert doc["protocol"]["name"] == "interleaved" and "shuffled" in doc["protocol"]["description"]
    ctl = doc["control"]
    assert ctl["limit"] == 0.05 and ctl["passed"] == (ctl["max_rel_diff"] <= 0.05)
    assert ctl["max_rel_diff"] == max(s["rel_diff"] for s in ctl["per_session"]) >= 0
    for r in doc["rows"]:
        assert {"model", "input", "batch", "sparsity", "latency_ratio", "macs_ratio", "file_ratio", "dense_copy_ms",
                "channels_removed", "channels_zero", "weights"} <= set(r)
        assert r["masks"] in ("one-shot", "bip") and r["structure"] == "group"
        assert r["latency_ratio"] > 0 and 0 < r["macs_ratio"] < 1 and 0 < r["file_ratio"] < 1
        assert r["channels_removed"] > 0 and r["channels_zero"] == 0  # group masks: every zero goes
    bip = [r for r in doc["rows"] if r["masks"] == "bip"]
    if data:
        assert len(bip) == 2 and all(0 <= r["test_acc"] <= 1 and "kept_filters_shared_with_one_shot" in r for r in bip)
        trained = {r["weights"] for r in doc["rows"] if r["masks"] == "one-shot"} - {"random init"}
        assert {r["weights"] for r in bip} == trained
    else:
        assert not bip and doc["trained"]["skipped"] == "--no-bip"
    ck = doc["checkpoint"]
    assert ck["sparsity"] == 0.9 and 0 < ck["size_ratio"] < 0.25
    assert doc["csr_linear"] and all("faster" in r for r in doc["csr_linear"])
    # ONNX Runtime: the dense and the compacted ONNX files, timed interleaved (skipped, with the
    # reason, only where the onnx packages are missing)
    if doc["onnxruntime_skipped"] is None:
        ort = doc["onnxruntime"]
        assert [(r["model"], r["batch"]) for r in ort] == [("resnet20", 1), ("resnet20", 2)]
        assert all(r["runtime"] == "onnxruntime" and r["latency_ratio"] == r["compact_ms"] / r["dense_ms"]
                   and r["masks"] == "one-shot" for r in ort)
    else:
        assert "not installed" in doc["onnxruntime_skipped"] and doc["onnxruntime"] == []


def test_full_run_refuses_without_cifar(tmp_path, capsys):
    """The BiP rows need CIFAR-10: without it the full run stops before any work, naming the way out."""
    path = tmp_path / "c.json"
    assert load_script("compact").main(["--data-dir", str(tmp_path / "nowhere"), "--json", str(path)]) == 2
    assert "--no-bip" in capsys.readouterr().err and not path.exists()


def test_interleaved_protocol():
    """Rounds of one chunk per kind in a shuffled order, the first round discarded, median over chunks."""
    timing = load_script("_timing")
    seen = []
    values = {"a": [9.0, 0.001, 0.003, 0.002], "b": [9.0, 0.010, 0.030, 0.020], "c": [9.0, 1.0, 1.0, 1.0]}

    def chunk(k):
        def run():
            seen.append(k)
            return values[k][seen.count(k) - 1]  # seconds per call of this kind's next chunk
        return run

    out = timing.interleaved({k: chunk(k) for k in values}, rounds=3, seed=0)
    rounds = [seen[i:i + 3] for i in range(0, len(seen), 3)]
    assert len(rounds) == 4 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # warm-up + 3, one chunk each
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert out["a"].median_ms == 2.0 and out["b"].median_ms == 20.0 and out["c"].median_ms == 1000.0
    assert out["a"].n == 3 and (out["a"].p20_ms, out["a"].p80_ms) == (1.4, 2.6)
    assert "discarded" in out["a"].method
