"""``bip_fast.export_onnx`` and ``export --onnx``: finalized and compacted models as ONNX files that
ONNX Runtime (CPU) runs with the PyTorch model's outputs (max abs diff <= 1e-4 x the output scale),
also in a process where bip_fast cannot be imported; clear one-line errors otherwise."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bip_fast
from bip_fast.models import build
from bip_fast.onnx_export import OnnxExportError

from _compact_helpers import bip_fast_modules, plain_params, randomise_norms, tv
from test_cli import QUICK, cli, dense_run, needs_data  # noqa: F401  (dense_run: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ort():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name)
    return pytest.importorskip("onnxruntime")


def ort_run(ort, path, *inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [torch.from_numpy(y) for y in sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]


def close(got, want):
    scale = max(float(w.abs().max()) for w in want)
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    assert diff <= 1e-4 * scale, (diff, scale)


def group_pruned(make, x, seed=0):
    torch.manual_seed(seed)
    model = randomise_norms(make())
    bip_fast.attach_groups(model, x)
    return bip_fast.OMP(model, 0.5, structure="group").model.eval()


def token_model():
    """The transformer example's model, BiP-pruned for two steps (masked linear and attention)."""
    spec = importlib.util.spec_from_file_location("transformer_bip", os.path.join(ROOT, "examples", "transformer_bip.py"))
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch.manual_seed(0)
    model = ex.TokenModel(16, 12, 16, 2, 1)
    alg = bip_fast.BiP(model, 0.5, compute_loss=ex.compute_loss, total_steps=2, score_lr=1.0)
    feed = ex.batches(16, 12, 8, "cpu", seed=1)
    for _ in range(2):
        alg.step(next(feed), next(feed))
    return model.eval()


def tokens(batch, seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 16, (batch, 12), generator=g)
    pad = torch.zeros(batch, 12, dtype=torch.bool)
    pad[0, -3:] = True  # a padded sequence: the key padding mask is a real input of the graph
    return tok, pad


def test_import_bip_fast_imports_no_onnx_package():
    code = ("import sys, bip_fast; assert callable(bip_fast.export_onnx); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:] + r.stdout


def test_torchvision_resnet18_compacted(ort, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    masked = group_pruned(lambda: tv("resnet18", num_classes=10), x)
    small = bip_fast.compact(masked, x)
    rep = bip_fast.export_onnx(small, x, tmp_path / "small.onnx")
    assert rep["max_abs_diff"] <= 1e-4 * rep["output_scale"] and rep["params"] < 0.6 * plain_params(masked)
    assert rep["outputs"] == ["output"] and os.listdir(tmp_path) == ["small.onnx"]  # weights inside, no side file
    x3 = torch.randn(3, 3, 64, 64)  # another batch size than the example's
    with torch.no_grad():
        close(ort_run(ort, tmp_path / "small.onnx", x3), [masked(x3)])


def test_cifar_resnet_masked_is_finalized_on_a_copy(ort, tmp_path):
    """A masked model (unstructured BiP masks here) is finalized inside; the caller's model keeps its
    masked layers, and the file holds the dense-format network (every weight, zeros included)."""
    torch.manual_seed(0)
    model = randomise_norms(build("resnet20"))
    masked = bip_fast.OMP(model, 0.9).model.eval()
    x = torch.randn(2, 3, 32, 32)
    rep = bip_fast.export_onnx(masked, x, tmp_path / "m.onnx")
    assert bip_fast_modules(masked) and rep["params"] == plain_params(masked)
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        close(ort_run(ort, tmp_path / "m.onnx", x5), [masked(x5)])


def test_transformer_example(ort, tmp_path):
    model = token_model()
    assert any(isinstance(m, bip_fast.MaskedMultiheadAttention) for m in model.modules())
    rep = bip_fast.export_onnx(model, tokens(2, 0), tmp_path / "tok.onnx")
    assert rep["inputs"] == ["tokens", "padding_mask"] and rep["outputs"] == ["logits", "hidden"]
    tok, pad = tokens(3, 1)
    with torch.no_grad():
        ref = model(tok, padding_mask=pad)
    close(ort_run(ort, tmp_path / "tok.onnx", tok, pad), [ref["logits"], ref["hidden"]])


# Runs in `python -I` (no PYTHONPATH, no script folder on sys.path) after dropping every sys.path
# entry holding a bip_fast folder and the editable-install finder: bip_fast must be unimportable,
# and torch is never imported.
STANDALONE = """
import importlib.util, os, sys
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "bip_fast"))]
sys.meta_path[:] = [f for f in sys.meta_path if "bip_fast" not in getattr(f, "__module__", "")]
assert importlib.util.find_spec("bip_fast") is None
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = {i.name: np.load(f) for i, f in zip(sess.get_inputs(), sys.argv[3].split(","))}
got = sess.run(None, feeds)
want = [np.load(f) for f in sys.argv[2].split(",")]
assert len(feeds) == len(sess.get_inputs()) and len(got) == len(want)
diff = max(float(np.abs(g.astype("f8") - w.astype("f8")).max()) for g, w in zip(got, want))
scale = max(float(np.abs(w.astype("f8")).max()) for w in want)
assert "torch" not in sys.modules
print(diff, scale)
"""


def run_standalone(onnx_path, inputs, outputs, tmp_path):
    ins, outs = [], []
    for kind, tensors, names in (("in", inputs, ins), ("out", outputs, outs)):
        for i, t in enumerate(tensors):
            names.append(str(tmp_path / f"{kind}{i}.npy"))
            np.save(names[-1], t.numpy())
    r = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(onnx_path), ",".join(outs), ",".join(ins)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    diff, scale = map(float, r.stdout.split())
    assert diff <= 1e-4 * scale, (diff, scale)


def test_runs_where_bip_fast_cannot_be_imported(ort, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    masked = group_pruned(lambda: build("resnet20"), x)
    bip_fast.export_onnx(bip_fast.compact(masked, x), x, tmp_path / "c.onnx")
    model = token_model()
    bip_fast.export_onnx(model, tokens(2, 0), tmp_path / "t.onnx")
    x4 = torch.randn(4, 3, 32, 32)
    tok, pad = tokens(3, 2)
    with torch.no_grad():
        run_standalone(tmp_path / "c.onnx", [x4], [masked(x4)], tmp_path)
        run_standalone(tmp_path / "t.onnx", [tok, pad], list(model(tok, padding_mask=pad).values()), tmp_path)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)  # a branch on a value: no graph to export


class Noisy(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)  # exports fine, never computes the same twice


def test_model_that_cannot_be_exported(ort, tmp_path):
    with pytest.raises(OnnxExportError) as e:
        bip_fast.export_onnx(DataDependent(), torch.randn(2, 4), tmp_path / "d.onnx")
    msg = str(e.value)
    assert "\n" not in msg and "torch.onnx.export(dynamo=True) failed for DataDependent" in msg
    assert not os.listdir(tmp_path)


def test_outputs_that_differ_name_the_difference(ort, tmp_path):
    with pytest.raises(ValueError, match=r"differ from the PyTorch model's by [0-9.e+-]+ \(output scale"):
        bip_fast.export_onnx(Noisy(), torch.randn(2, 8), tmp_path / "n.onnx")
    assert not os.listdir(tmp_path)


def test_size_one_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch dimension of at least 2"):
        bip_fast.export_onnx(build("resnet20"), torch.randn(1, 3, 32, 32), tmp_path / "b.onnx")


def hide(monkeypatch, name):
    """find_spec says ``name`` is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_missing_package_is_named(monkeypatch, tmp_path):
    hide(monkeypatch, "onnxruntime")
    with pytest.raises(OnnxExportError, match=r"not installed: onnxruntime \(pip install onnxruntime\)"):
        bip_fast.export_onnx(build("resnet20"), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


def test_cli_missing_package_writes_nothing(monkeypatch, capsys, tmp_path):
    from bip_fast.cli import main

    torch.save(build("resnet20").state_dict(), tmp_path / "model.pt")
    hide(monkeypatch, "onnxscript")
    code = main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--arch", "resnet20", "--out",
                 str(tmp_path / "exp"), "--onnx", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "onnxscript" in err[0], err
    assert not (tmp_path / "exp").exists()


def test_cli_export_onnx_dense_format(ort, tmp_path):
    """Without --compact: model.onnx is the finalized dense-format model."""
    x = torch.randn(2, 3, 32, 32)
    masked = group_pruned(lambda: build("resnet20"), x)
    torch.save(masked.state_dict(), tmp_path / "model.pt")
    r = cli("export", "--checkpoint", tmp_path / "model.pt", "--arch", "resnet20", "--out", tmp_path / "exp",
            "--onnx", "--device", "cpu")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["onnx"].endswith("model.onnx") and "compact" not in rep
    plain = build("resnet20").eval()
    plain.load_state_dict(torch.load(tmp_path / "exp" / "model_dense_format.pt"))
    x3 = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = ort_run(ort, rep["onnx"], x3)
        close(got, [plain(x3)])
        close(got, [masked(x3)])
    r = cli("export", "--checkpoint", tmp_path / "model.pt", "--arch", "resnet20", "--out", tmp_path / "exp",
            "--onnx", check=False)
    assert r.returncode == 2 and "model.onnx" in r.stderr  # refuses to overwrite


@needs_data
def test_cli_prune_group_then_export_onnx_compact(ort, dense_run, tmp_path):
    run, exp = tmp_path / "group", tmp_path / "export"
    cli("prune", *QUICK, "--method", "bip", "--structure", "group", "--sparsity", "0.5", "--pretrained", dense_run,
        "--out", run)
    r = cli("export", "--checkpoint", run, "--out", exp, "--compact", "--onnx")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["onnx"] == str(exp / "model_compact.onnx") and os.path.isfile(rep["onnx"])
    assert rep["onnx_max_abs_diff"] is not None and rep["compact_params"] < 0.6 * rep["params"]
    plain = build("resnet20").eval()
    plain.load_state_dict(torch.load(exp / "model_dense_format.pt"))
    small = torch.export.load(rep["compact"]).module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = ort_run(ort, rep["onnx"], x)
        close(got, [plain(x)])
        close(got, [small(x)])


def test_onnx_latency_helper_rows(ort):
    """benchmarks/_onnx_latency.py (for benchmarks/compact.py): one row per batch, both sessions
    checked against PyTorch before timing; one round, so it only shows the shape of the output."""
    from _script_helpers import load_script

    onnx_latency_rows = load_script("_onnx_latency").onnx_latency_rows
    x = torch.randn(2, 3, 32, 32)
    masked = group_pruned(lambda: build("resnet20"), x)
    dense = bip_fast.finalize(build("resnet20"))
    rows = onnx_latency_rows(dense, bip_fast.compact(masked, x), x, batches=(1, 4), rounds=1, chunk_seconds=0.01)
    assert [r["batch"] for r in rows] == [1, 4] and all(r["runtime"] == "onnxruntime" for r in rows)
    for r in rows:
        assert r["dense_ms"] > 0 and r["compact_ms"] > 0 and r["latency_ratio"] == r["compact_ms"] / r["dense_ms"]
        assert r["threads"] == 2 and r["dense_diff"] <= 1e-3 and r["compact_diff"] <= 1e-3


def test_cli_export_compact_onnx_compacts_once(ort, monkeypatch, capsys, tmp_path):
    """``export --compact --onnx`` compacts the model once; the .pt2 and the ONNX file are the same
    compacted model (same parameter count as a fresh ``compact``)."""
    from bip_fast.cli import main
    from bip_fast.engine import evaluation

    x = torch.randn(2, 3, 32, 32)
    masked = group_pruned(lambda: build("resnet20"), x)
    torch.save(masked.state_dict(), tmp_path / "model.pt")
    from bip_fast import compaction

    calls = []
    real = compaction.compact
    counted = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(evaluation, "compact_model", counted)  # the export's own name for it
    monkeypatch.setattr(compaction, "compact", counted)  # what export_compact calls
    code = main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--arch", "resnet20", "--out",
                 str(tmp_path / "exp"), "--compact", "--onnx", "--device", "cpu"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(calls) == 1
    small = torch.export.load(rep["compact"]).module()
    assert rep["compact_params"] == sum(p.numel() for p in bip_fast.compact(masked.eval(), x).parameters())
    x3 = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        close(ort_run(ort, rep["onnx"], x3), [small(x3)])
