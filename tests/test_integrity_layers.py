"""Layers that cannot be masked are named, never silently left dense; structured masks and input messages."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bip_fast
from bip_fast.masks import project
from bip_fast.pruning import get_algorithm


# ----------------------------------------------------------------------------- 5-6. masked or named
def test_swin_t_attention_weights_are_named_not_silently_unmasked():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(num_classes=10)
    with pytest.warns(UserWarning, match=r"24 layer\(s\) left dense.*features\.1\.0\.attn\.qkv"):
        bip_fast.sparsify(model)
    rep = bip_fast.sparsity_report(model)
    assert len(rep["skipped"]) == 24 and all("ShiftedWindowAttention" in s["reason"] for s in rep["skipped"])
    assert not any(n.endswith(("attn.qkv", "attn.proj")) for n, _ in bip_fast.masked_modules(model))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.linear(x, self.fc.weight, self.fc.bias).relu())


class ReadsWeightIndirectly(ReadsWeight):
    def forward(self, x):
        lin = getattr(self, "fc")
        return self.head(F.linear(x, getattr(lin, "weight"), lin.bias).relu())


def test_weight_read_outside_the_masked_forward():
    m = ReadsWeight()
    with pytest.warns(UserWarning, match=r"fc \(weight read directly by ReadsWeight"):
        bip_fast.sparsify(m)
    assert type(m.fc) is nn.Linear and bip_fast.sparsity_report(m)["skipped"][0]["name"] == "fc"
    # a use the source scan cannot see: refused by name at the first step, not a crash or silence
    for kw in ({}, {"variant": "official"}):
        alg = get_algorithm("bip")(ReadsWeightIndirectly(), 0.5, **kw)
        with pytest.raises(ValueError, match=r"weight of 'fc' \(MaskedLinear\) is used outside its masked forward"):
            alg.step((torch.randn(4, 8), torch.randint(0, 3, (4,))))


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(24, 16))
    model.add_module("att", nn.MultiheadAttention(16, 2, kdim=8, vdim=8))  # separate q/k/v weights
    model.add_module("bil", nn.Bilinear(4, 4, 2))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) left dense.*att \(separate q/k/v projection weights"):
        bip_fast.sparsify(model)
    rep = bip_fast.sparsity_report(model)
    assert {s["name"]: s["type"] for s in rep["skipped"]} == {"att": "MultiheadAttention", "bil": "Bilinear"}
    assert rep["skipped"][0]["numel"] == 16 * 16 + 2 * 16 * 8 + 16 * 16  # q, k, v projections + out_proj.weight
    assert [type(m).__name__ for _, m in bip_fast.masked_modules(model)] == ["MaskedConv1d", "MaskedLinear"]
    with pytest.warns(UserWarning, match="no conv / linear layer to mask"):
        bip_fast.sparsify(nn.Sequential(nn.ReLU()))


# ----------------------------------------------------------------------------- 7, 12. structure, inputs
@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_structured_masks_keep_one_filter_or_channel(structure):
    scores = [torch.randn(16, 8, 3, 3), torch.randn(10, 16)]
    for mk in project(scores, 0.01, structure):
        dim = 0 if structure == "filter" else 1
        alive = mk.transpose(0, dim).reshape(mk.shape[dim], -1).any(dim=1)
        assert int(alive.sum()) == 1


def test_input_messages():
    with pytest.raises(TypeError, match="include: expected a module name.*got int"):
        bip_fast.sparsify(nn.Linear(2, 2), include=123)
    with pytest.raises(ValueError, match=r"shape \(8, 1, 3, 3\)"):
        project([torch.randn(8, 1, 3, 3)], 0.5, "nm")
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"layer '0': input dimension 9"):
        get_algorithm("omp")(depthwise, 0.5, structure="nm")
