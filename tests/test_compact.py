"""bip_fast.compact: the masked and the compacted model compute the same function (fp32, max abs
difference <= 1e-4 x output scale), and the compacted one holds exactly the kept channels
(parameters and MACs counted from the masks). Small inputs, batch 1-2, eval mode."""
from __future__ import annotations

import pytest
import torch

import bip_fast
from bip_fast.models import build

from bip_fast.compaction import REACHES as C_REACHES, count_macs

from _compact_helpers import bip_fast_modules, expected_macs, expected_params, plain_params, randomise_norms, tv

def _narrow_vgg():
    """torchvision's VGG-16-BN with its classifier's hidden width 4096 cut to 64 (same layout:
    flatten of 512x7x7, two hidden Linear layers with biases and no BatchNorm), to keep the test fast."""
    model = tv("vgg16_bn", num_classes=10)
    nn = torch.nn
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return model


CASES = {
    "resnet20": (lambda: build("resnet20"), (2, 3, 32, 32)),
    "resnet56": (lambda: build("resnet56"), (1, 3, 32, 32)),
    "tv_resnet18": (lambda: tv("resnet18", num_classes=10), (1, 3, 64, 64)),
    "tv_resnet50": (lambda: tv("resnet50", num_classes=10), (1, 3, 64, 64)),
    "vgg16_bn": (lambda: build("vgg16_bn"), (1, 3, 32, 32)),
    "tv_vgg16_bn": (lambda: _narrow_vgg(), (1, 3, 32, 32)),
    "tv_mobilenet_v2": (lambda: tv("mobilenet_v2", num_classes=10), (1, 3, 32, 32)),
}


def _pruned(name, sparsity, algo=bip_fast.OMP):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = randomise_norms(make())
    x = torch.randn(*shape)
    bip_fast.attach_groups(model, x)
    alg = algo(model, sparsity, structure="group")
    return alg.model.eval(), x


def _check(masked, x, small):
    assert not bip_fast_modules(small), bip_fast_modules(small)
    with torch.no_grad():
        ref, out = masked(x), small(x)
    assert float((ref - out).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert sum(p.numel() for p in small.parameters()) == expected_params(masked)
    assert count_macs(small, x[:1]) == expected_macs(masked, x)


@pytest.mark.parametrize("name", list(CASES))
def test_masked_equals_compacted(name):
    masked, x = _pruned(name, 0.5)
    small = bip_fast.compact(masked, x)
    _check(masked, x, small)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * plain_params(masked)


@pytest.mark.parametrize("sparsity", [0.2, 0.8])
def test_masked_equals_compacted_other_sparsities(sparsity):
    masked, x = _pruned("resnet20", sparsity)
    _check(masked, x, bip_fast.compact(masked, x))


def test_target_torchvision_resnet18_bip_half():
    """The issue's target: BiP(model, 0.5, structure="group") -> compact: same outputs, <= 60% of the parameters."""
    masked, x = _pruned("tv_resnet18", 0.5, bip_fast.BiP)
    small = bip_fast.compact(masked, x)
    _check(masked, x, small)
    assert sum(p.numel() for p in small.parameters()) <= 0.6 * plain_params(masked)


def test_training_keeps_masked_equal_to_compacted():
    """After BiP steps (BatchNorm statistics and weights moved, masks re-projected) the functions still agree."""
    torch.manual_seed(1)
    model = randomise_norms(build("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    bip_fast.attach_groups(model, x)
    alg = bip_fast.BiP(model, 0.5, structure="group", score_lr=1.0)
    for _ in range(3):
        alg.step((torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))))
    masked = alg.model.eval()
    _check(masked, x, bip_fast.compact(masked, x))


def test_dense_plain_model_compacts_to_itself():
    model = randomise_norms(build("resnet20")).eval()
    x = torch.randn(1, 3, 32, 32)
    small = bip_fast.compact(model, x)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())


def test_wrong_removal_is_caught(monkeypatch):
    """The safety net: had live channels been judged removable (every filter zero, nothing
    non-zero reaching a reader), the comparison refuses the result."""
    import bip_fast.compaction as C

    class NothingReaches(dict):
        def get(self, key, default=None):
            return torch.zeros(1 << 16, dtype=torch.bool)

    masked, x = _pruned("resnet20", 0.5)
    monkeypatch.setattr(C, "_filter_zero", lambda mod, mem: torch.ones(len(mem.index), dtype=torch.bool))
    monkeypatch.setattr(C, "_reaching", lambda plain, groups, example_inputs: NothingReaches())
    with pytest.raises(ValueError, match="was not zero where a layer reads it"):
        bip_fast.compact(masked, x)


def test_gate_that_does_not_map_zero_to_zero_keeps_the_channel():
    """A zero channel that an added constant turns non-zero before the next layer stays (as zeros)."""
    from torch import nn

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x) + 1.0)

    model = Shifted()
    with torch.no_grad():
        model.a.weight[1].zero_()
        model.a.bias[1] = 0.0
    small, rep = bip_fast.compact(model, torch.randn(2, 3, 4, 4), return_report=True)
    assert small.a.out_channels == 4 and rep.channels_removed == 0 and rep.filters_zero == 1
    assert rep.kept_because == {C_REACHES: 1}
