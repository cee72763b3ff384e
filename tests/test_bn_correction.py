"""BiP(bn_correction=True): a pruned filter's score gradient, where a BatchNorm alone reads the
filter's output, is scaled by sqrt(eps / (σ² + eps)) of its switched-on output; kept filters and
layers without such a BatchNorm are untouched; bad values refused; checkpoints keep the option."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bip_fast.models import CifarResNet
from bip_fast.nn import norms_after, sparsify
from bip_fast.pruning import BiP


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),  # no BatchNorm after this one
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_norms_after_finds_the_batchnorm_that_alone_reads_a_conv():
    m = CifarResNet(8)
    got = norms_after(m)
    assert got["conv1"] == "bn1" and got["layer1.0.conv2"] == "layer1.0.bn2" and got["layer3.0.conv1"] == "layer3.0.bn1"
    assert len(got) == 7
    assert norms_after(sparsify(CifarResNet(8))) == got  # masked layers too
    assert norms_after(_net()) == {"0": "1"}


def _grads(corrected: bool, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alg = BiP(_net(), 0.75, structure="filter", score_lr=1.0, bn_correction=corrected, exclude=["7"])
    with torch.no_grad():
        alg.model[1].bias.fill_(0.5)  # β > 0: the ReLU passes the gradient of a pruned filter's channel
    out = alg.model.train()(x)
    F.cross_entropy(out, y).backward()
    return alg, [m.scores.grad.clone() for m in alg.modules]


def test_pruned_filters_scaled_by_their_switched_on_spread():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 5, 5, generator=g), torch.randint(0, 4, (6,), generator=g)
    alg, raw = _grads(False, x, y)
    _, fixed = _grads(True, x, y)
    conv, bn = alg.model[0], alg.model[1]
    pruned = ~conv.mask.flatten(1).any(dim=1)
    assert 0 < int(pruned.sum()) < 8
    z = F.conv2d(x, conv.weight[pruned], None, 1, 1)
    c = torch.sqrt(bn.eps / (z.var(dim=(0, 2, 3), unbiased=False) + bn.eps))
    torch.testing.assert_close(fixed[0][pruned], raw[0][pruned] * c.view(-1, 1, 1, 1))
    assert torch.equal(fixed[0][~pruned], raw[0][~pruned])
    assert bool((c < 0.05).all())  # eps 1e-5 against a spread of order 1
    assert torch.equal(fixed[1], raw[1])  # the second conv has no BatchNorm after it: untouched
    assert raw[0][pruned].abs().sum() > 0


def test_training_with_the_correction_keeps_exact_k():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alg = BiP(CifarResNet(8), 0.8, structure="filter", score_lr=1.0, bn_correction=True, total_steps=3,
                  exclude=["linear"])
    assert len(alg._bn_hooks.layers) == 7
    for _ in range(3):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        alg.step((x, y), (x, y))
        for name, m in zip(alg.module_names, alg.modules):
            if name != "linear":
                assert int(m.mask.flatten(1).any(dim=1).sum()) == max(1, round(0.2 * m.mask.shape[0]))
    assert alg._bn_hooks.inputs == {}  # every backward used and released its layer's input
    with torch.no_grad():
        alg.model.eval()(x)
    assert alg._bn_hooks.inputs == {}  # an evaluation has no backward: nothing kept
    alg.remove_hooks()
    assert alg._bn_hooks is None


def test_bad_values_and_checkpoints():
    with pytest.raises(TypeError, match="bn_correction"):
        BiP(_net(), 0.5, score_lr=1.0, bn_correction="yes")
    with pytest.raises(ValueError, match="bn_correction"):
        BiP(_net(), 0.5, score_lr=1.0, bn_correction=True, variant="official")
    a = BiP(_net(), 0.5, score_lr=1.0, bn_correction=True)
    with pytest.raises(ValueError, match="bn_correction"):
        BiP(_net(), 0.5, score_lr=1.0).load_state_dict(a.state_dict())
    old = BiP(_net(), 0.5, score_lr=1.0).state_dict()
    old.pop("bn_correction")  # made before the option: it meant False
    BiP(_net(), 0.5, score_lr=1.0).load_state_dict(old)


def test_untraceable_model_warns_and_runs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.bn(self.conv(x))
            if h.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                h = h * 2
            return self.fc(h.mean(dim=(2, 3)))

    with pytest.warns(UserWarning, match="bn_correction finds no BatchNorm"):
        alg = BiP(Branchy(), 0.5, score_lr=1.0, bn_correction=True)
    x = torch.randn(2, 3, 6, 6)
    alg.step((x, torch.tensor([0, 1])))


def plan_and_algorithm(**options):
    """The plan text and the built algorithm of a one-epoch CLI config for BiP on ResNet-8 with
    ``options`` (also used by test_unit_scores)."""
    from bip_fast.engine import plan_segments
    from bip_fast.engine.plan import describe_plan
    from bip_fast.engine.setup import build_algorithm
    from test_loop import config

    cfg = config("x", method="bip", pretrained="p", epochs=1, score_lr=1.0, **options).resolved()
    segs = plan_segments(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return describe_plan(cfg, segs, 2), build_algorithm(segs[-1], cfg, CifarResNet(8), 2, lambda mod: mod)


def test_cli_flag():
    from test_loop import config

    plan, alg = plan_and_algorithm(structure="filter", bn_correction=True)
    assert "BatchNorm-corrected filter scores" in plan
    assert alg.bn_correction and len(alg._bn_hooks.layers) == 7
    with pytest.raises(ValueError, match="--method bip"):
        config("x", method="omp", bn_correction=True).resolved()
