"""The conv net, image batches and method list shared by the test_baselines_* files."""

import torch
from torch import nn

BASELINES = ("snip", "grasp", "synflow", "gmp")


def conv_net(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1)]
    layers += [nn.BatchNorm2d(6)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def img_batches(seed, n, b=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]
