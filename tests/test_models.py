"""Tests for bip_fast.models: architectures, parameter counts, initialisation, errors."""
import math

import pytest
import torch
import torch.nn as nn

from bip_fast import models
from bip_fast.models import ARCHS, build


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("arch, expected", [
    ("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet18", 11.17e6), ("vgg16_bn", 14.73e6)])
def test_param_counts(arch, expected):
    n = _nparams(build(arch))
    assert abs(n - expected) <= 0.02 * expected, f"{arch}: {n} parameters"


def test_exact_resnet_counts():
    # He et al. option-A CIFAR ResNets; VGG-16-BN with one Linear(512, 10) head.
    assert _nparams(build("resnet20")) == 269_722
    assert _nparams(build("resnet56")) == 853_018
    assert _nparams(build("resnet18")) == 11_173_962
    assert _nparams(build("vgg16_bn")) == 14_724_042
    # only the classifier depends on num_classes
    assert _nparams(build("resnet20", 100)) - _nparams(build("resnet20")) == 90 * 65


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shapes(arch, num_classes):
    torch.manual_seed(0)
    m = build(arch, num_classes).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def test_channels_last_and_backward():
    torch.manual_seed(0)
    m = build("resnet20")
    x = torch.randn(4, 3, 32, 32)
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_layers_only(arch):
    m = build(arch)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert convs and linears
    assert all(type(x) is nn.Conv2d for x in convs) and all(type(x) is nn.Linear for x in linears)
    # every parameter belongs to a conv, linear or batch-norm layer
    owned = {id(p) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
             for p in x.parameters(recurse=False)}
    assert owned == {id(p) for p in m.parameters()}


def test_resnet20_structure_option_a():
    m = build("resnet20")
    blocks = [b for b in m.modules() if isinstance(b, models.BasicBlock)]
    assert len(blocks) == 9
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 19  # 1 + 9 * 2
    shortcuts = [b.shortcut for b in blocks if isinstance(b.shortcut, models.ShortcutA)]
    assert len(shortcuts) == 2 and all(_nparams(s) == 0 for s in shortcuts)
    assert [x.out_channels for x in m.modules() if isinstance(x, nn.Conv2d)][::6] == [16, 16, 32, 64]
    # option A: subsample by 2, zero-pad channels evenly
    s = models.ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = s(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.all(y[:, :8] == 0) and torch.all(y[:, 24:] == 0)


def test_resnet18_cifar_stem():
    m = build("resnet18")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert m.linear.in_features == 512


def test_vgg_head():
    m = build("vgg16_bn", 100)
    assert isinstance(m.classifier, nn.Linear) and m.classifier.in_features == 512
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 13
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 13


def test_kaiming_init():
    torch.manual_seed(0)
    m = build("resnet56")
    w = m.layer3[1].conv1.weight  # 64 x 64 x 3 x 3
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() - math.sqrt(2.0 / fan_out)) < 0.1 * math.sqrt(2.0 / fan_out)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_torchvision_models():
    m = build("tv_resnet18", num_classes=7)
    assert m.fc.out_features == 7
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="tv_resnet50"):
        build("tv_not_a_model")


def test_errors():
    with pytest.raises(ValueError) as ei:
        build("resnet99")
    for name in ARCHS:
        assert name in str(ei.value)
    assert "tv_" in str(ei.value)
    with pytest.raises(TypeError, match="arch"):
        build(20)
    with pytest.raises(ValueError, match="num_classes"):
        build("resnet20", 0)
    with pytest.raises(TypeError, match="num_classes"):
        build("resnet20", 10.0)
    assert set(ARCHS) >= {"resnet20", "resnet56", "resnet18", "vgg16_bn"}


def test_cifar_resnet_projection_shortcuts():
    import torch
    from bip_fast.models import CifarResNet

    m = CifarResNet(8, shortcut="B")
    proj = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels) for c in proj] == [(16, 32), (32, 64)]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(8, shortcut="C")
