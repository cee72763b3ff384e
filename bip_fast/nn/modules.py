"""Drop-in masked layers: nn.Conv2d / nn.Linear plus a ``scores`` parameter and a ``mask`` buffer.

forward computes with z = m ⊙ θ; backward gives ``weight.grad = m ⊙ g`` and
``scores.grad = sign(s) ⊙ (θ ⊙ g − ig_scale · m ⊙ g ⊙ g)`` (SPEC §3) from one fused kernel.
No hooks, no parametrizations, no requires_grad toggling: the mask changes only through
``mask.copy_()`` (so compiled graphs stay valid), and each optimiser steps its own parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops


class _MaskedMixin:
    """Shared state of the masked layers. ``ig_scale`` is 1/γ (0.0: plain straight-through)."""

    weight: nn.Parameter
    scores: nn.Parameter
    mask: torch.Tensor
    ig_scale: float
    backend: Optional[str]

    def _init_masking(self) -> None:
        self.ig_scale = 0.0
        self.backend = None
        self.scores = nn.Parameter(self.weight.detach().to(torch.float32).clone())
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    def reset_parameters(self) -> None:  # called by the nn base constructor, then by users
        super().reset_parameters()  # type: ignore[misc]
        if "scores" in self._parameters:
            with torch.no_grad():
                self.scores.copy_(self.weight)

    def _masked_weight(self) -> torch.Tensor:
        return ops.masked_weight(self.weight, self.scores, self.mask, self.ig_scale, backend=self.backend)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Copy a bool mask of the weight's shape into the buffer (in place)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask: expected shape {tuple(self.mask.shape)} like weight, got {tuple(mask.shape)}")
        with torch.no_grad():
            self.mask.copy_(mask)

    def density(self) -> float:
        return float(self.mask.sum()) / self.mask.numel()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A plain nn.Conv2d / nn.Linear state dict loads too: scores from the weight, a full mask.
        wkey = prefix + "weight"
        if wkey in state_dict:
            w = state_dict[wkey]
            if prefix + "scores" not in state_dict:
                state_dict[prefix + "scores"] = w.detach().to(torch.float32).clone()
            if prefix + "mask" not in state_dict:
                state_dict[prefix + "mask"] = torch.ones(w.shape, dtype=torch.bool)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ig_scale={self.ig_scale}"  # type: ignore[misc]


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d whose weight is masked; the convolution itself runs through cuDNN/ATen."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._init_masking()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self._masked_weight(), self.bias)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear whose weight is masked (Triton: mask applied to weight tiles as they load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_masking()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(
            input, self.weight, self.scores, self.mask, self.bias, self.ig_scale, backend=self.backend
        )


MASKED_TYPES = (MaskedConv2d, MaskedLinear)
__all__ = ["MaskedConv2d", "MaskedLinear", "MASKED_TYPES"]
