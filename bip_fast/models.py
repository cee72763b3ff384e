"""CIFAR model zoo built from plain ``nn.Conv2d`` / ``nn.Linear`` layers.

The pruning algorithms turn those layers into masked ones later (``bip_fast.sparsify``), so every
model here uses the stock layer classes and nothing that hides a weight from them.

- ``resnet20/32/44/56/110``: the CIFAR ResNets of He et al. (2016): a 3x3 stem with 16 channels,
  three stages of 16/32/64 channels with (depth - 2) / 6 basic blocks each, global average pooling
  and one linear layer. Shortcuts are "option A": stride-2 subsampling plus zero channel padding,
  without parameters. resnet20 has 0.27M parameters, resnet56 0.85M (10 classes).
- ``resnet18``: the ImageNet ResNet-18 layout with a CIFAR stem (3x3 conv, stride 1, no max-pool)
  and 1x1-conv + BatchNorm projection shortcuts; 11.17M parameters.
- ``vgg16_bn``: VGG-16 with BatchNorm after every conv; for 32x32 inputs the five max-pools reduce
  the map to 1x1, and the classifier is a single ``Linear(512, num_classes)``; 14.73M parameters.
- ``resnet50``: torchvision's ImageNet ResNet-50 (the paper's ImageNet model; 224x224 inputs),
  25.56M parameters (1000 classes).
- ``resnet18_64``: torchvision's ResNet-18 with a stem for 64x64 Tiny-ImageNet inputs: a 3x3
  stride-1 first convolution and no max-pool (the CIFAR stem), so layer1 runs at 64x64.
  Both keep torchvision's module names, hence its state_dict keys (``conv1``, ``layer1.0.conv1``,
  ``fc``...), before and after ``sparsify``, and torchvision's initialisation.
- ``tv_<name>``: ``torchvision.models.<name>(weights=None, num_classes=num_classes)``.

Initialisation: convolutions Kaiming-normal (fan_out, ReLU gain), BatchNorm weight 1 / bias 0,
linear layers keep PyTorch's default Kaiming-uniform initialisation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ARCHS", "build", "CifarResNet", "ResNet18", "VGG"]


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (option-A shortcuts)
# --------------------------------------------------------------------------------------------

class ShortcutA(nn.Module):
    """Parameter-free shortcut: keep every ``stride``-th pixel, zero-pad the new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_lo, self.pad_hi = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad_lo or self.pad_hi:
            x = F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))
        return x


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif option == "A":
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet of depth 6n+2 (three stages, 16/32/64 channels). ``shortcut``: "A"
    (the paper's: subsampling and zero-padding, no parameters) or "B" (1x1 conv + BatchNorm
    projections where the shape changes)."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth: expected 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut: expected 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, projection shortcuts."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, "B"),
                                        BasicBlock(planes, planes, 1, "B")))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm; classifier = one Linear(512, num_classes) (32x32 -> 1x1 map)."""

    def __init__(self, cfg=_VGG16, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # identity for 32x32 inputs
        return self.classifier(out)


# --------------------------------------------------------------------------------------------
# torchvision ImageNet-layout models
# --------------------------------------------------------------------------------------------

def _tv_resnet(name: str, num_classes: int, small_stem: bool = False) -> nn.Module:
    import torchvision.models as tvm

    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    if small_stem:
        conv = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv
        model.maxpool = nn.Identity()
    return model


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_BUILDERS = {
    "resnet20": lambda k: CifarResNet(20, k),
    "resnet32": lambda k: CifarResNet(32, k),
    "resnet44": lambda k: CifarResNet(44, k),
    "resnet56": lambda k: CifarResNet(56, k),
    "resnet110": lambda k: CifarResNet(110, k),
    "resnet18": lambda k: ResNet18(k),
    "vgg16_bn": lambda k: VGG(_VGG16, k),
    "resnet50": lambda k: _tv_resnet("resnet50", k),
    "resnet18_64": lambda k: _tv_resnet("resnet18", k, small_stem=True),
}
ARCHS: tuple[str, ...] = tuple(_BUILDERS)
TV_PREFIX = "tv_"


def _tv_names() -> list[str]:
    import torchvision.models as tvm
    return sorted(tvm.list_models(module=tvm))


def build(arch: str, num_classes: int = 10) -> nn.Module:
    """Build ``arch`` (one of ``ARCHS`` or ``"tv_<torchvision classification model>"``) with a
    fresh, randomly initialised ``num_classes``-way classifier (never pretrained weights)."""
    if not isinstance(arch, str):
        raise TypeError(f"arch: expected a str, got {type(arch).__name__}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    key = arch.lower()
    if key in _BUILDERS:
        return _BUILDERS[key](num_classes)
    if key.startswith(TV_PREFIX):
        name = arch[len(TV_PREFIX):]
        names = _tv_names()
        if name not in names:
            raise ValueError(f"arch: torchvision has no classification model {name!r}; valid "
                             f"'tv_' names: {', '.join(TV_PREFIX + n for n in names)}")
        import torchvision.models as tvm
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"arch: expected one of {', '.join(ARCHS)} or 'tv_<torchvision model>' "
                     f"(e.g. tv_resnet50), got {arch!r}")
