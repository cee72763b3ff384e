"""Smoke test of benchmarks/compact.py: the --quick run (ResNet-20, tiny timing) and its JSON."""
import json

from test_benchmarks_smoke import _load  # the one loader of benchmark scripts by file path


def test_quick_run_writes_rows_and_checkpoint(tmp_path):
    path = tmp_path / "compact.json"
    assert _load("compact").main(["--quick", "--threads", "1", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "compact" and doc["rows"]
    for r in doc["rows"]:
        assert {"model", "input", "batch", "sparsity", "latency_ratio", "macs_ratio", "file_ratio"} <= set(r)
        assert r["latency_ratio"] > 0 and 0 < r["macs_ratio"] < 1 and 0 < r["file_ratio"] < 1
    ck = doc["checkpoint"]
    assert ck["sparsity"] == 0.9 and 0 < ck["size_ratio"] < 0.25
    assert doc["csr_linear"] and all("faster" in r for r in doc["csr_linear"])
