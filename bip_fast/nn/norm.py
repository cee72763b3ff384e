"""BatchNorm with a channel mask: the normalisation of a channel that the group structure removes.

A removed channel must output exactly 0 for the masked model to compute what the compacted one
computes; a plain BatchNorm would still emit its shift β there (after a ReLU, a constant). So the
BatchNorm layers of a channel group become :class:`MaskedBatchNorm2d` (1d/3d alike): the same
constructor, parameters and state-dict keys as nn.BatchNorm2d plus a bool ``channel_mask`` buffer,
and a forward that uses ``weight ⊙ mask`` and ``bias ⊙ mask`` (two C-element products per call;
the activations are never touched). Running statistics are kept for every channel. The mask changes
only through ``channel_mask.copy_()``, so compiled graphs stay valid.
"""

from __future__ import annotations

from typing import Dict, Type

import torch
import torch.nn.functional as F
from torch import nn


class _ChannelMaskedNorm:
    num_features: int
    channel_mask: torch.Tensor

    def _init_channel_mask(self) -> None:
        if not self.affine:  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__}: a channel mask needs affine=True (a removed channel "
                             f"outputs 0 through its scale and shift)")
        self.register_buffer("channel_mask", torch.ones(self.num_features, dtype=torch.bool,
                                                        device=self.weight.device))  # type: ignore[attr-defined]

    def set_channel_mask(self, keep: torch.Tensor) -> None:
        """Copy a bool vector of ``num_features`` into the buffer (in place)."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != self.channel_mask.shape:
            raise ValueError(f"channel_mask: expected a bool tensor of shape {tuple(self.channel_mask.shape)}, got "
                             f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
        with torch.no_grad():
            self.channel_mask.copy_(keep)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm's own bookkeeping (momentum=None: cumulative average), masked scale and shift.
        self._check_input_dim(input)  # type: ignore[attr-defined]
        factor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        use_running = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        keep = self.channel_mask.to(self.weight.dtype)  # type: ignore[attr-defined]
        return F.batch_norm(input, self.running_mean if use_running else None,  # type: ignore[attr-defined]
                            self.running_var if use_running else None,  # type: ignore[attr-defined]
                            self.weight * keep, self.bias * keep, batch_stats, factor, self.eps)  # type: ignore[attr-defined]

    def to_plain(self) -> nn.Module:
        """The plain BatchNorm with the mask baked into scale and shift (running statistics kept)."""
        plain = PLAIN_NORM_OF[type(self)](self.num_features, eps=self.eps, momentum=self.momentum,  # type: ignore[attr-defined]
                                          affine=True, track_running_stats=self.track_running_stats,  # type: ignore[attr-defined]
                                          device=self.weight.device, dtype=self.weight.dtype)  # type: ignore[attr-defined]
        sd = {k: v for k, v in self.state_dict().items() if k != "channel_mask"}  # type: ignore[attr-defined]
        keep = self.channel_mask.to(self.weight.dtype)  # type: ignore[attr-defined]
        sd["weight"] = self.weight.detach() * keep  # type: ignore[attr-defined]
        sd["bias"] = self.bias.detach() * keep  # type: ignore[attr-defined]
        plain.load_state_dict(sd)
        plain.train(self.training)  # type: ignore[attr-defined]
        return plain

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A plain BatchNorm's state dict loads too: every channel kept.
        if prefix + "weight" in state_dict and prefix + "channel_mask" not in state_dict:
            state_dict[prefix + "channel_mask"] = torch.ones(self.num_features, dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)


def _make(base: Type[nn.Module]) -> Type[nn.Module]:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_channel_mask()

    name = "Masked" + base.__name__
    return type(name, (_ChannelMaskedNorm, base), {"__init__": __init__, "__module__": __name__,
                                                   "__doc__": f"nn.{base.__name__} with a channel mask."})


MaskedBatchNorm1d = _make(nn.BatchNorm1d)
MaskedBatchNorm2d = _make(nn.BatchNorm2d)
MaskedBatchNorm3d = _make(nn.BatchNorm3d)



class MaskedSyncBatchNorm(_ChannelMaskedNorm, nn.SyncBatchNorm):
    """nn.SyncBatchNorm with a channel mask (DDP with ``sync_bn``; :func:`to_sync_norms`).

    SyncBatchNorm's own forward (statistics over the whole process group) times the mask:
    (x̂·w + b)·m = x̂·(w·m) + b·m, so outputs and gradients equal the masked scale and shift of
    :class:`MaskedBatchNorm2d` (one multiply of the activations more)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats, process_group,
                                  device, dtype)
        self._init_channel_mask()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = nn.SyncBatchNorm.forward(self, input)
        shape = [1, -1] + [1] * (input.dim() - 2)
        return out * self.channel_mask.to(out.dtype).view(shape)


MASKED_NORM_OF: Dict[type, type] = {nn.BatchNorm1d: MaskedBatchNorm1d, nn.BatchNorm2d: MaskedBatchNorm2d,
                                    nn.BatchNorm3d: MaskedBatchNorm3d, nn.SyncBatchNorm: MaskedSyncBatchNorm}
PLAIN_NORM_OF: Dict[type, type] = {v: k for k, v in MASKED_NORM_OF.items()}
MASKED_NORM_TYPES = tuple(PLAIN_NORM_OF)


def to_masked_norm(bn: nn.Module) -> nn.Module:
    """The channel-masked version of a BatchNorm layer, keeping its very Parameter and buffer objects."""
    cls = MASKED_NORM_OF[type(bn)]
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device="meta", dtype=bn.weight.dtype)
    new.weight, new.bias = bn.weight, bn.bias
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[k] = bn._buffers.get(k)
    new._buffers["channel_mask"] = torch.ones(bn.num_features, dtype=torch.bool, device=bn.weight.device)
    if isinstance(bn, nn.SyncBatchNorm):
        new.process_group = bn.process_group
    new.train(bn.training)
    return new


def to_sync_norms(model: nn.Module, process_group=None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm that keeps channel masks: channel-masked BatchNorm
    layers become :class:`MaskedSyncBatchNorm`, plain ones nn.SyncBatchNorm; the very Parameter
    and buffer objects (the channel mask included) are kept. Returns the model (a new object only
    where ``model`` itself is a BatchNorm layer)."""
    def convert(bn: nn.Module) -> nn.Module:
        if isinstance(bn, nn.SyncBatchNorm):
            return bn
        if isinstance(bn, MASKED_NORM_TYPES):
            new = MaskedSyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                      track_running_stats=bn.track_running_stats, process_group=process_group,
                                      device="meta", dtype=bn.weight.dtype)
            new.weight, new.bias = bn.weight, bn.bias
            for k in ("running_mean", "running_var", "num_batches_tracked", "channel_mask"):
                new._buffers[k] = bn._buffers.get(k)
            new.train(bn.training)
            return new
        return nn.SyncBatchNorm.convert_sync_batchnorm(bn, process_group)

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return convert(model)
    for name, bn in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, convert(bn))
    return model


__all__ = ["MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d", "MaskedSyncBatchNorm", "MASKED_NORM_OF",
           "MASKED_NORM_TYPES", "to_masked_norm", "to_sync_norms"]
