"""``export --compact`` and :func:`bip_fast.compaction.export_compact`: a group-pruned model written
by torch.export, loaded in a process where bip_fast cannot be imported, computing what the masked
model computes with fewer parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import bip_fast
from bip_fast.models import build

from _compact_helpers import plain_params, randomise_norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs with bip_fast made unimportable: the file must need torch only.
LOADER = """
import sys
sys.modules["bip_fast"] = None
import torch
small = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(small(x), sys.argv[3])
print(sum(p.numel() for p in small.parameters()))
"""


def _load_without_bip_fast(path, x, tmp_path):
    torch.save(x, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "y.pt"), int(r.stdout.split()[-1])


def _group_pruned():
    torch.manual_seed(0)
    model = randomise_norms(build("resnet20"))
    bip_fast.attach_groups(model, torch.randn(2, 3, 32, 32))
    return bip_fast.OMP(model, 0.5, structure="group").model.eval()


def test_export_compact_loads_without_bip_fast(tmp_path):
    from bip_fast.compaction import export_compact

    masked = _group_pruned()
    rep = export_compact(masked, torch.randn(2, 3, 32, 32), tmp_path / "small.pt2")
    x = torch.randn(3, 3, 32, 32)  # another batch size than the example's
    y, n = _load_without_bip_fast(tmp_path / "small.pt2", x, tmp_path)
    with torch.no_grad():
        ref = masked(x)
    assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert n == rep["params"] < 0.5 * plain_params(masked)


def test_cli_export_compact(tmp_path):
    masked = _group_pruned()
    torch.save(masked.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bip_fast", "export", "--checkpoint", str(tmp_path / "model.pt"),
                        "--arch", "resnet20", "--out", str(out), "--compact", "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["compact"].endswith("model_compact.pt2") and rep["compact_params"] < rep["params"]
    x = torch.randn(2, 3, 32, 32)
    y, _ = _load_without_bip_fast(rep["compact"], x, tmp_path)
    with torch.no_grad():
        ref = masked(x)
    assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    plain = build("resnet20")  # the dense-format file still loads into the architecture
    plain.load_state_dict(torch.load(out / "model_dense_format.pt"))
