"""Inputs of ``benchmarks/kernels.py``: the prunable weights of a CIFAR ResNet-18 (or, for --quick,
the same layers with fewer channels) and the shapes of the masked-module section."""

from __future__ import annotations

import os
import sys
from typing import List, Sequence, Tuple

import torch

try:  # imported as part of a package (python -m benchmarks.kernels)
    from . import _common as C
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]


# CIFAR ResNet-18 (3x3 stem, BasicBlocks [2, 2, 2, 2], 1x1 projection shortcuts, fc 512 -> 10),
# in registration order; used only if bip_fast.models cannot build the model.
_RESNET18_SHAPES: List[Tuple[int, ...]] = (
    [(64, 3, 3, 3)]
    + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3)]
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), (512, 512, 3, 3), (512, 512, 3, 3)]
    + [(10, 512)]
)


def resnet18_weights(seed: int = 0) -> Tuple[List[torch.Tensor], str]:
    """The 21 prunable weights of a freshly initialised CIFAR ResNet-18 (CPU, fp32) and where the
    shapes came from. Real initialisations give each layer its own magnitude range, which is
    what the radix select sees in training."""
    torch.manual_seed(seed)
    try:
        from bip_fast import models

        model = models.build("resnet18")
        ws = [m.weight.detach().clone() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        return ws, "bip_fast.models.build('resnet18')"
    except Exception as e:  # engine not importable: same architecture, Kaiming-uniform-like init
        C.log(f"kernels: building resnet18 failed ({type(e).__name__}: {e}); using hard-coded shapes")
        ws = []
        for shp in _RESNET18_SHAPES:
            fan_in = 1
            for d in shp[1:]:
                fan_in *= d
            bound = 1.0 / fan_in**0.5
            ws.append((torch.rand(shp) * 2 - 1) * bound)
        return ws, "hard-coded ResNet-18 shapes"


def shrink(ws: Sequence[torch.Tensor], factor: int = 8) -> List[torch.Tensor]:
    """--quick: the same layer list with channel dimensions >= 64 divided by ``factor``."""
    out = []
    for w in ws:
        shp = [d // factor if i < 2 and d >= 64 else d for i, d in enumerate(w.shape)]
        out.append(w.flatten()[: _numel(shp)].reshape(shp).clone())
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt_n(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _module_configs(gpu: bool, quick: bool):
    """(kind, label, constructor args, input shape)."""
    if quick:
        return [("linear", "Linear 64->64 x[16,64]", (64, 64), (16, 64)),
                ("conv", "Conv 8->8 3x3 x[2,8,8,8]", (8, 8), (2, 8, 8, 8))]
    if gpu:
        return [("linear", "Linear 512->512 x[128,512]", (512, 512), (128, 512)),
                ("linear", "Linear 512->512 x[8192,512]", (512, 512), (8192, 512)),
                ("linear", "Linear 1024->1024 x[8192,1024]", (1024, 1024), (8192, 1024)),
                ("conv", "Conv 64->64 3x3 x[128,64,32,32]", (64, 64), (128, 64, 32, 32)),
                ("conv", "Conv 128->128 3x3 x[128,128,16,16]", (128, 128), (128, 128, 16, 16))]
    # The last two are ResNet-20 layers (stages 1 and 3) at the training batch of 128.
    return [("linear", "Linear 512->512 x[128,512]", (512, 512), (128, 512)),
            ("conv", "Conv 64->64 3x3 x[16,64,16,16]", (64, 64), (16, 64, 16, 16)),
            ("conv", "Conv 16->16 3x3 x[128,16,32,32]", (16, 16), (128, 16, 32, 32)),
            ("conv", "Conv 64->64 3x3 x[128,64,8,8]", (64, 64), (128, 64, 8, 8))]
