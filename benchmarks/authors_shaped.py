"""The baseline iteration for benchmarks/step.py: a BiP iteration shaped like the authors' code.

Written from the description in SPEC §6 (not from that code), in plain PyTorch with standard
``nn.Conv2d`` / ``nn.Linear`` subclasses and popup-score masking, so that the per-iteration cost
of that structure can be measured against ``bip_fast.BiP.step``. The *work* per iteration is
what matters here, not bit-exact numerics:

- every forward pass first concatenates the scores of all layers and fully sorts them
  (``torch.sort`` of the concatenation) to find the global top-K threshold, and every masked
  layer then rebuilds its weight: score -> threshold -> mask -> weight * mask;
- 4 forward and 3 backward passes per iteration:
  1. forward/backward on the lower batch B_beta, optimiser 1 steps (theta-step);
  2. forward/backward on B_alpha at the new weights: the weight gradient, flattened with
     ``torch.cat``, feeds the implicit-gradient term;
  3. forward/backward on B_alpha: the score gradient; the flattened IG term -lr2 * g**2 is added
     (``torch.cat`` of all score gradients, then split back), optimiser 2 steps (m-step);
  4. a train-mode forward on B_alpha without gradient, only for logging loss and accuracy;
- two ``torch.optim.SGD`` optimisers (momentum 0.9, weight decay 1e-4) over *all* parameters,
  gradients zeroed rather than freed (``zero_grad(set_to_none=False)``, the PyTorch 1.x
  behaviour), so each optimiser also applies momentum and weight decay to the other level's
  parameters; both levels at one learning rate.

Scores are separate parameters initialised from |theta| here (the authors alias score and weight
storage; aliasing changes nothing in the amount of work per iteration).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AuthorsShapedBiP", "PopupConv2d", "PopupLinear"]


class _STEMask(torch.autograd.Function):
    """mask = 1[|s| >= threshold] forward; identity (straight-through) backward."""

    @staticmethod
    def forward(ctx, abs_scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return (abs_scores >= threshold).to(abs_scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Threshold:
    """Holds the global threshold computed by the model's sort at the start of each forward."""

    def __init__(self) -> None:
        self.value: torch.Tensor = torch.zeros(())


class _PopupMixin:
    scores: nn.Parameter
    holder: _Threshold

    def masked_weight(self) -> torch.Tensor:
        mask = _STEMask.apply(self.scores.abs(), self.holder.value)
        return self.weight * mask


class PopupConv2d(nn.Conv2d, _PopupMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class PopupLinear(nn.Linear, _PopupMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def _popup(m: nn.Module, holder: _Threshold) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        new = PopupConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                          m.groups, m.bias is not None, m.padding_mode, device=m.weight.device,
                          dtype=m.weight.dtype)
    else:
        new = PopupLinear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device,
                          dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.scores = nn.Parameter(m.weight.detach().abs().clone())
    new.holder = holder
    return new


class _PopupNet(nn.Module):
    """The wrapped model; its forward sorts all scores first (one full sort per forward)."""

    def __init__(self, model: nn.Module, density: float) -> None:
        super().__init__()
        self.holder = _Threshold()
        names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _popup(getattr(parent, child), self.holder))
        self.net = model
        self.layers: List[nn.Module] = [m for m in model.modules() if isinstance(m, _PopupMixin)]
        self.n = sum(m.scores.numel() for m in self.layers)
        self.k = int(density * self.n + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([m.scores.detach().abs().flatten() for m in self.layers])
        sorted_scores, _ = torch.sort(flat)
        self.holder.value = sorted_scores[self.n - self.k] if self.k > 0 else sorted_scores[-1] + 1
        return self.net(x)


class AuthorsShapedBiP:
    """``step(lower_batch, upper_batch)``: one authors'-shaped BiP iteration (see module docstring).

    ``model`` is deep-copied; its conv and linear layers become popup-score layers.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4, lr2: float = 1e-4) -> None:
        self.model = _PopupNet(copy.deepcopy(model), 1.0 - sparsity)
        self.model.train()
        self.lr2 = lr2
        params = list(self.model.parameters())
        self.scores = [m.scores for m in self.model.layers]
        self.opt1 = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.opt2 = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _loss(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def step(self, lower, upper) -> Dict[str, torch.Tensor]:
        # 1. theta-step on B_beta (forward 1, backward 1)
        self.opt1.zero_grad(set_to_none=False)
        self._loss(lower).backward()
        self.opt1.step()
        # 2. weight gradient on B_alpha at the new weights (forward 2, backward 2), flattened
        self.opt2.zero_grad(set_to_none=False)
        self._loss(upper).backward()
        g_theta = torch.cat([m.weight.grad.flatten() for m in self.model.layers])
        ig_flat = -self.lr2 * g_theta * g_theta
        # 3. score gradient on B_alpha (forward 3, backward 3) + flattened IG term
        self.opt2.zero_grad(set_to_none=False)
        self._loss(upper).backward()
        g_s = torch.cat([s.grad.flatten() for s in self.scores])
        g_s = g_s + ig_flat
        offset = 0
        for s in self.scores:
            n = s.numel()
            s.grad.copy_(g_s[offset:offset + n].view_as(s))
            offset += n
        self.opt2.step()
        # 4. logging forward (train mode, no gradient)
        with torch.no_grad():
            x, y = upper
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            correct = (out.argmax(1) == y).sum()
        return {"loss": loss, "correct": correct}
