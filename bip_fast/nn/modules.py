"""Drop-in masked layers: nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Linear and
nn.MultiheadAttention plus a ``scores`` parameter and a ``mask`` buffer (same constructor
signatures and state-dict keys as the plain layers, plus ``scores`` and ``mask``).

forward computes with z = m ⊙ θ; backward gives ``weight.grad = m ⊙ g`` and
``scores.grad = sign(s) ⊙ (θ ⊙ g − ig_scale · m ⊙ g ⊙ g)`` (SPEC §3) from one fused kernel.
No hooks, no parametrizations, no requires_grad toggling: the mask changes only through
``mask.copy_()`` (so compiled graphs stay valid), and each optimiser steps its own parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class _MaskedMixin:
    """Shared state of the masked layers. ``ig_scale`` is 1/γ (0.0: plain straight-through)."""

    weight: nn.Parameter
    scores: nn.Parameter
    mask: torch.Tensor
    ig_scale: float
    backend: Optional[str]
    out_dim = 0  # the weight dimension of the output channels (filter-wise pruning's filters)
    _weight_key = "weight"  # the state-dict key of the masked weight

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

    def set_bias_mask(self, keep: torch.Tensor) -> None:
        """Mask the bias with a bool vector of its length (in place; the ``bias_mask`` buffer is
        registered on first use, so layers without one keep their state-dict keys). The group
        structure sets it on the output channels it removes, so a removed filter outputs exactly 0."""
        if self.bias is None:
            raise ValueError(f"bias_mask: {type(self).__name__} has no bias")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != self.bias.shape:
            raise ValueError(f"bias_mask: expected a bool tensor of shape {tuple(self.bias.shape)}, got "
                             f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
        if "bias_mask" not in self._buffers:
            self.register_buffer("bias_mask", torch.ones_like(keep, device=self.bias.device))
        with torch.no_grad():
            self._buffers["bias_mask"].copy_(keep)

    def _masked_bias(self) -> Optional[torch.Tensor]:
        keep = self._buffers.get("bias_mask")
        return self.bias if keep is None or self.bias is None else self.bias * keep.to(self.bias.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A plain layer's state dict loads too: scores from the weight, a full mask.
        wkey = prefix + self._weight_key
        if wkey in state_dict:
            w = state_dict[wkey]
            if prefix + "scores" not in state_dict:
                state_dict[prefix + "scores"] = w.detach().to(torch.float32).clone()
            if prefix + "mask" not in state_dict:
                state_dict[prefix + "mask"] = torch.ones(w.shape, dtype=torch.bool)
        if prefix + "bias_mask" in state_dict and "bias_mask" not in self._buffers and self.bias is not None:
            self.register_buffer("bias_mask", torch.ones(self.bias.shape, dtype=torch.bool, device=self.bias.device))
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ig_scale={self.ig_scale}"  # type: ignore[misc]


class _MaskedConv(_MaskedMixin):
    """nn.Conv1d/2d/3d whose weight is masked; the convolution itself runs through cuDNN/ATen."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__(  # type: ignore[call-arg]
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._init_masking()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self._masked_weight(), self._masked_bias())  # type: ignore[attr-defined]


class MaskedConv2d(_MaskedConv, nn.Conv2d):
    """nn.Conv2d whose weight is masked; the convolution itself runs through cuDNN/ATen."""


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear whose weight is masked (Triton: mask applied to weight tiles as they load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_masking()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(
            input, self.weight, self.scores, self.mask, self._masked_bias(), self.ig_scale, backend=self.backend
        )


class MaskedConv1d(_MaskedConv, nn.Conv1d):
    """nn.Conv1d whose weight is masked."""


class MaskedConv3d(_MaskedConv, nn.Conv3d):
    """nn.Conv3d whose weight is masked."""


class _MaskedConvTranspose(_MaskedMixin):
    """Transposed convolutions: the weight is (in, out / groups, *kernel), so the output
    channels (the filters of filter-wise pruning) are dimension 1."""

    out_dim = 1
    _conv_t = None  # F.conv_transpose{1,2,3}d
    _nd = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding,  # type: ignore[call-arg]
                         groups, bias, dilation, padding_mode, device, dtype)
        self._init_masking()

    def forward(self, input: torch.Tensor, output_size=None) -> torch.Tensor:
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            input, output_size, self.stride, self.padding, self.kernel_size, self._nd, self.dilation)
        return type(self)._conv_t(input, self._masked_weight(), self._masked_bias(), self.stride, self.padding,  # type: ignore[attr-defined]
                                  output_padding, self.groups, self.dilation)


class MaskedConvTranspose1d(_MaskedConvTranspose, nn.ConvTranspose1d):
    """nn.ConvTranspose1d whose weight is masked."""

    _conv_t, _nd = staticmethod(F.conv_transpose1d), 1


class MaskedConvTranspose2d(_MaskedConvTranspose, nn.ConvTranspose2d):
    """nn.ConvTranspose2d whose weight is masked."""

    _conv_t, _nd = staticmethod(F.conv_transpose2d), 2


class MaskedConvTranspose3d(_MaskedConvTranspose, nn.ConvTranspose3d):
    """nn.ConvTranspose3d whose weight is masked."""

    _conv_t, _nd = staticmethod(F.conv_transpose3d), 3


class MaskedMultiheadAttention(_MaskedMixin, nn.MultiheadAttention):
    """nn.MultiheadAttention (same constructor) whose projections are masked.

    ``in_proj_weight`` (the packed q/k/v projection, ``(3 E, E)``) carries this module's
    ``scores`` and ``mask``; ``out_proj`` is a :class:`MaskedLinear`. The forward is PyTorch's own
    ``F.multi_head_attention_forward`` on the masked weights (nn.MultiheadAttention's fused
    inference fast path reads the raw weights, so it is not used). State-dict keys are
    nn.MultiheadAttention's plus ``scores``, ``mask``, ``out_proj.scores`` and ``out_proj.mask``.
    Separate q/k/v projections (``kdim`` or ``vdim`` other than ``embed_dim``) are refused.
    """

    _weight_key = "in_proj_weight"

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        if (kdim is not None and kdim != embed_dim) or (vdim is not None and vdim != embed_dim):
            raise ValueError(f"MaskedMultiheadAttention: separate q/k/v projections (kdim={kdim}, vdim={vdim}, "
                             f"embed_dim={embed_dim}) are not supported")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        plain = self.out_proj  # initialised by nn.MultiheadAttention: keep its values
        self.out_proj = MaskedLinear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        with torch.no_grad():
            self.out_proj.weight.copy_(plain.weight)
            self.out_proj.scores.copy_(plain.weight)
            if bias:
                self.out_proj.bias.copy_(plain.bias)
        self._init_masking()

    @property
    def weight(self) -> nn.Parameter:
        """The masked weight: the packed input projection."""
        return self.in_proj_weight

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self._masked_weight(), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj._masked_weight(),
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, ig_scale={self.ig_scale}"


# plain layer type -> its masked counterpart (exact types: subclasses of these are left alone)
MASKED_OF = {
    nn.Linear: MaskedLinear,
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
    nn.Conv3d: MaskedConv3d,
    nn.ConvTranspose1d: MaskedConvTranspose1d,
    nn.ConvTranspose2d: MaskedConvTranspose2d,
    nn.ConvTranspose3d: MaskedConvTranspose3d,
}
PLAIN_OF = {v: k for k, v in MASKED_OF.items()}
MASKED_TYPES = tuple(MASKED_OF.values()) + (MaskedMultiheadAttention,)
__all__ = ["MaskedConv1d", "MaskedConv2d", "MaskedConv3d", "MaskedConvTranspose1d", "MaskedConvTranspose2d",
           "MaskedConvTranspose3d", "MaskedLinear", "MaskedMultiheadAttention", "MASKED_TYPES", "MASKED_OF", "PLAIN_OF"]
