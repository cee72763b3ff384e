"""Smoke test of benchmarks/kernels.py: the --quick run on tiny sizes, and its JSON structure.

The script is loaded from its file (benchmarks/ is not a package); it runs on the CPU with the
default backends (the Triton interpreter is excluded unless named), so it takes seconds.
"""

import json
import math

import pytest
import torch

from _script_helpers import load_script


@pytest.fixture(scope="module")
def kernels():
    return load_script("kernels")


@pytest.fixture(scope="module")
def quick_result(kernels, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "kernels.json"
    rc = kernels.main(["--quick", "--device", "cpu", "--json", str(path)])
    assert rc == 0
    with open(path) as f:
        return json.load(f)


def test_quick_json_structure(quick_result):
    doc = quick_result
    for key in ("benchmark", "device", "versions", "commit", "env", "config", "rows", "summary", "bandwidth"):
        assert key in doc, key
    assert doc["benchmark"] == "kernels"
    assert doc["versions"]["torch"] == torch.__version__
    assert isinstance(doc["commit"], str) and doc["commit"]
    assert doc["env"]["cpu_count"] >= 1
    cfg = doc["config"]
    assert cfg["quick"] is True and cfg["device"] == "cpu"
    assert "reference" in cfg["backends"]
    assert "triton" not in cfg["backends"]  # the interpreter is only benchmarked when named
    assert len(cfg["shapes"]) == 21
    assert cfg["numel"] == sum(math.prod(s) for s in cfg["shapes"])
    assert doc["bandwidth"]["copy_gbs"] > 0 and doc["bandwidth"]["read_gbs"] > 0

    row_keys = {"op", "backend", "config", "median_ms", "p20_ms", "p80_ms", "repeats", "metric", "metrics",
                "targets", "passed"}
    for row in doc["rows"]:
        assert row_keys <= set(row), row
        if row["median_ms"] is not None:
            assert row["median_ms"] > 0 and math.isfinite(row["median_ms"])
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        for t in row["targets"]:
            assert set(t) == {"name", "value", "op", "threshold", "passed"}
        if row["targets"]:
            assert row["passed"] == all(t["passed"] for t in row["targets"])
    judged = [r for r in doc["rows"] if r["passed"] is not None]
    assert doc["summary"]["judged"] == len(judged)
    assert doc["summary"]["passed"] + doc["summary"]["failed"] == len(judged)


def test_quick_covers_every_op_and_backend(quick_result):
    doc = quick_result
    rows = doc["rows"]
    timed = {(r["op"], r["backend"]) for r in rows if r["median_ms"] is not None}
    errored = {(e["op"], e["backend"]) for e in doc["errors"]}
    for base in ("torch.sort (cat, desc)", "torch.kthvalue (cat)", "torch.topk (cat)", "_foreach sequence",
                 "torch.optim.SGD(foreach=True)", "nn.Linear fwd+bwd", "nn.Conv2d fwd+bwd"):
        assert (base, "baseline") in timed, base
    for b in doc["config"]["backends"]:
        for op in ("topk_masks", "fused_sgd_", "fused_sgd_ + hist1", "MaskedLinear fwd+bwd", "MaskedConv2d fwd+bwd"):
            assert (op, b) in timed or (op, b) in errored, (op, b)
    # The reference backend is the spec: it always runs.
    for op in ("topk_masks", "fused_sgd_", "MaskedLinear fwd+bwd", "MaskedConv2d fwd+bwd"):
        assert (op, "reference") in timed, op
    # Both densities were measured.
    topk_cfgs = {r["config"] for r in rows if r["op"] == "topk_masks"}
    assert any("d=0.1" in c for c in topk_cfgs) and any("d=0.5" in c for c in topk_cfgs)


def test_mismatch_aborts(kernels, monkeypatch, tmp_path):
    from bip_fast import ops

    real = ops.topk_masks

    def wrong(scores, keep, **kw):
        masks = real(scores, keep, **kw)
        masks[0] = masks[0].clone()
        masks[0].view(-1)[0] ^= True
        return masks

    monkeypatch.setattr(ops, "topk_masks", wrong)
    with pytest.raises(kernels.CorrectnessError):
        kernels.main(["--quick", "--device", "cpu", "--sections", "topk", "--densities", "0.1",
                      "--backends", "reference", "--json", str(tmp_path / "k.json")])


def test_common_helpers(tmp_path):
    common = load_script("_common")
    t = common.Timing.from_samples([5.0, 1.0, 2.0, 3.0, 4.0], "test")
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.n) == (3.0, 1.8, 4.2, 5)
    row = common.Row("op", "cpu", "cfg", t, metric="2.0x")
    row.add_target("x", 2.0, ">=", 3.0)
    assert row.passed is False
    table = common.markdown_table([row])
    assert table.splitlines()[0].startswith("| op | backend | config | median ms")
    assert "FAIL" in table
    env = common.environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__ and "commit" in env
    doc = common.write_json(str(tmp_path / "r.json"), benchmark="t", env=env, config={"a": 1}, rows=[row])
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["passed"] is False
    assert doc["summary"] == {"rows": 1, "judged": 1, "passed": 0, "failed": 1}
