"""Shared machinery of the pruning algorithms: SGD groups, cosine schedule, state, divergence guard.

Every algorithm is a small object around a model whose conv/linear layers are masked modules
(:mod:`bip_fast.nn`). It owns its optimisers as :class:`SGDGroup` objects (plain PyTorch SGD
semantics, dampening 0, no Nesterov, momentum buffers starting at zero, one
:func:`bip_fast.ops.fused_sgd_` launch per group) and a step counter that drives an optional
cosine schedule, so the whole training state is a handful of tensors and integers that
``state_dict()`` captures and ``load_state_dict()`` restores for a bit-identical resume.

``step(batch, batch2=None)`` returns ``{"loss", "correct", "count"}`` as 0-dim tensors taken from
the training forward pass itself (no ``.item()``, no extra forward for logging).

Batches and losses: by default a batch is an ``(inputs, targets)`` pair of tensors, the loss is
``loss_fn(model(inputs), targets)`` (cross-entropy unless given) and ``correct`` counts the argmax
hits where the output is ``(B, C)`` logits and the targets ``(B,)`` labels. With
``compute_loss=f`` every training pass calls ``loss = f(model, batch)`` instead: the batch is any
structure of tensors (a dict, a tuple of several inputs, nested) handed to ``f`` as it is, the
model may return anything, and ``f`` returns the scalar loss. ``step`` then returns ``{"loss"}``
only (plus ``"upper_loss"`` for two-pass BiP): no accuracy, since only ``f`` knows what a
prediction is.
Gradients are cleared with ``p.grad = None`` and produced by ``loss.backward()`` (so DDP's
all-reduce works); each optimiser then steps only its own parameters.

Divergence guard (``nonfinite_guard``, on by default; :mod:`._guard`): every forward/backward
reduces its loss and gradients to one flag on the device, and the fused update skips itself on
that flag (no host synchronisation per step). Weights, scores, masks, momentum buffers and
norm-layer running statistics (restored from a snapshot taken before the forward) stay as they
were, and :class:`NonFiniteError` names the step when the host next reads the flag: every pass
on the CPU, every ``nonfinite.check_every`` passes (64) on an accelerator, and before any host-side
change of state. Until then every later update is skipped too. ``nonfinite.limit`` (0) steps may
be skipped instead of stopping; the schedule counts skipped steps. In two-pass schedules
(alternating BiP) an earlier pass's update of the same iteration stays applied; it was computed
from finite values.

Which masked layers a structure keeps dense, and the projection of scores into masks:
:mod:`._projection`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..masks import apply_masks
from ..nn import masked_modules, sparsify
from ._collapse import CollapseWatch
from ._guard import NonFiniteError, NonFiniteGuard
# _project_into stays importable from here (the algorithms import it from base)
from ._projection import ROW_STRUCTURES, _dense_outputs, _project_into, _selects_the_masked  # noqa: F401
from ._validate import (Batch, _check_any_batch, _check_batch, _check_loss_args, _check_loss_value, _check_number,
                        _check_total_steps, check_sparsity)

__all__ = ["Algorithm", "SGDGroup", "cosine_factor", "check_sparsity", "NonFiniteError", "ROW_STRUCTURES"]

def cosine_factor(step: int, total_steps: Optional[int]) -> float:
    """Multiplier of the base learning rate at ``step``: 0.5·(1 + cos(π·step/total)), 1 without a total.

    Step 0 runs at the base rate; from ``total_steps`` on the factor stays 0.
    """
    if total_steps is None:
        return 1.0
    t = min(step, total_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t / total_steps))


# ----------------------------------------------------------------------------- optimiser
class SGDGroup:
    """SGD over a fixed list of parameters (PyTorch semantics: d = g + wd·p; b = μ·b + d; p −= lr·b).

    ``lr`` is the base learning rate; the algorithm passes the scheduled rate to :meth:`step`.
    Momentum buffers are allocated zero up front, so a zero buffer and "no step taken yet" are
    the same state (this equals PyTorch's first-step ``buf = d``).
    """

    def __init__(self, name: str, params: Sequence[torch.Tensor], lr: float, momentum: float,
                 weight_decay: float) -> None:
        self.name = name
        self.params: List[torch.Tensor] = list(params)
        self.lr = _check_number(lr, f"{name} lr", low=0.0)
        self.momentum = _check_number(momentum, "momentum", low=0.0)
        self.weight_decay = _check_number(weight_decay, f"{name} weight_decay", low=0.0)
        self.buffers: List[torch.Tensor] = [
            torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in self.params
        ]

    def __repr__(self) -> str:
        return (f"SGDGroup({self.name!r}, {len(self.params)} tensors, lr={self.lr}, momentum={self.momentum}, "
                f"weight_decay={self.weight_decay})")

    @torch.no_grad()
    def step(self, lr: float, grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
             want_hist: bool = False, skip: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One update at learning rate ``lr``; ``grads`` defaults to each parameter's ``.grad``.

        Parameters whose gradient is None are skipped (PyTorch semantics). With ``want_hist``
        and every parameter updated, returns the first radix-digit histogram of the updated
        parameters (from the same launch), for :func:`bip_fast.ops.topk_masks`; else None.
        ``skip``: a one-element bool tensor on the device; when true nothing changes.
        """
        if grads is None:
            grads = [p.grad for p in self.params]
        ps, gs, bs = [], [], []
        for p, g, b in zip(self.params, grads, self.buffers):
            if g is None:
                continue
            ps.append(p.data)
            gs.append(g.detach())
            bs.append(b)
        hist = None
        if want_hist and ps and len(ps) == len(self.params):
            hist = torch.zeros(4096, dtype=torch.int64, device=ps[0].device)
        if ps:
            ops.fused_sgd_(ps, gs, bs, float(lr), self.momentum, self.weight_decay, hist1=hist, skip=skip)
        return hist

    def state_dict(self) -> Dict[str, object]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "buffers": [b.clone() for b in self.buffers]}

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, object]) -> None:
        bufs = sd["buffers"]
        if len(bufs) != len(self.buffers):
            raise ValueError(f"state_dict: optimiser {self.name!r} expected {len(self.buffers)} momentum buffers, "
                             f"got {len(bufs)}")
        for i, (dst, src) in enumerate(zip(self.buffers, bufs)):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"state_dict: optimiser {self.name!r} buffer[{i}]: expected shape "
                                 f"{tuple(dst.shape)}, got {tuple(src.shape)}")
            dst.copy_(src)
        self.lr = float(sd["lr"])
        self.momentum = float(sd["momentum"])
        self.weight_decay = float(sd["weight_decay"])

    def reset(self) -> None:
        """Zero the momentum buffers (a fresh optimiser)."""
        for b in self.buffers:
            b.zero_()


# ----------------------------------------------------------------------------- algorithm
class Algorithm:
    """Base class: model, SGD groups, step counter, cosine schedule, state.

    Subclasses set ``self.param_groups`` (name -> :class:`SGDGroup`; each group holds its
    ``params``, base ``lr``, ``momentum``, ``weight_decay`` and momentum ``buffers``) and implement
    :meth:`step`. ``step_count`` drives the cosine schedule (it restarts with an IMP round or the
    Hydra finetune phase); ``global_step`` counts every step.
    ``model`` is sparsified in place (:func:`bip_fast.nn.sparsify` with ``include``/``exclude``)
    unless it already holds masked modules; :attr:`model` is the (possibly replaced) model. The
    training passes call ``self.model(x)`` (or ``compute_loss(self.model, batch)``); a caller may
    replace ``model`` by a proxy that routes calls through DDP / torch.compile and everything
    else to the plain model. ``loss_fn`` and ``compute_loss``: see the module docstring (one of
    them at most).

    ``structure`` (the subclass's mask structure): under the filter and channel structures
    (``ROW_STRUCTURES``) the layers that produce the model's output (:func:`bip_fast.nn.output_layers`,
    e.g. the classifier) stay dense, as in the authors' structured runs (SPEC §2), unless
    ``include`` selects them; one UserWarning names them. Their mask stays all-True (they keep
    their scores and masks, so checkpoints and state-dict keys do not change) and they are listed
    in :attr:`dense_outputs`. N:M keeps N of every M weights of each row, so it never removes an
    output and prunes them like every other layer; ``"group"`` keeps their output channels by its
    own trace (:mod:`bip_fast.masks.group_trace`).
    """

    name = "base"
    uses_masks = True

    def __init__(self, model: nn.Module, *, total_steps: Optional[int] = None,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 compute_loss: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
                 include=None, exclude=None, structure: Optional[str] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        _check_loss_args(loss_fn, compute_loss)
        self.total_steps = _check_total_steps(total_steps)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.compute_loss = compute_loss
        if self.uses_masks and not masked_modules(model):
            model = sparsify(model, include=include, exclude=exclude)
        elif self.uses_masks and (include is not None or exclude is not None) and \
                not _selects_the_masked(model, include, exclude):
            warnings.warn("include/exclude: the model already holds masked layers, so it is not sparsified "
                          "again and include/exclude are ignored (but for include selecting a layer that "
                          "produces the model's output under structure filter / channel); pass them to "
                          "bip_fast.sparsify(model, ...) instead (it keeps the masked layers and masks the "
                          "others it selects)", UserWarning, stacklevel=3)
        self.model = model
        named = masked_modules(model)
        self.module_names: List[str] = [n for n, _ in named]
        self.modules: List[nn.Module] = [m for _, m in named]
        if self.uses_masks and not self.modules:
            raise ValueError("model: has no nn.Conv2d / nn.Linear layer to prune (after include/exclude)")
        self.dense_outputs: List[int] = _dense_outputs(self.model, self.module_names, structure, include) \
            if self.uses_masks else []
        self.param_groups: Dict[str, SGDGroup] = {}
        self.step_count = 0  # steps taken in the current round / phase (drives the schedule)
        self.global_step = 0  # steps taken in total
        self.nonfinite_guard = True  # see the module docstring
        self.nonfinite = NonFiniteGuard()
        self.collapse = CollapseWatch()  # layers a mask empties: empty_layers, a warning (_collapse.py)

    # -- parameters ---------------------------------------------------------------------
    def _weights(self) -> List[nn.Parameter]:
        return [m.weight for m in self.modules]

    def _scores(self) -> List[nn.Parameter]:
        return [m.scores for m in self.modules]

    def _others(self) -> List[nn.Parameter]:
        """Every trainable parameter that is neither a masked weight nor a score."""
        skip = {id(p) for p in self._weights()} | {id(p) for p in self._scores()}
        return [p for p in self.model.parameters() if id(p) not in skip and p.requires_grad]

    def _lower_params(self) -> List[nn.Parameter]:
        """Masked weights, then biases / norm parameters / unpruned layers."""
        return self._weights() + self._others()

    # -- schedule -----------------------------------------------------------------------
    def lr_factor(self) -> float:
        """Cosine multiplier for the current step (1.0 without ``total_steps``)."""
        return cosine_factor(self.step_count, self.total_steps)

    def current_lrs(self) -> Dict[str, float]:
        f = self.lr_factor()
        return {k: g.lr * f for k, g in self.param_groups.items()}

    # -- passes -------------------------------------------------------------------------
    def _zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _check_batch(self, batch, name: str):
        """An (inputs, targets) pair of tensors, or with ``compute_loss`` any structure of tensors."""
        return _check_batch(batch, name) if self.compute_loss is None else _check_any_batch(batch, name)

    def _forward_backward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One training forward + backward; metrics come from this very forward."""
        if not self.model.training:
            self.model.train()
        self._zero_grad()
        snap = self._snapshot_buffers() if self.nonfinite_guard else None
        if self.compute_loss is None:
            x, y = batch
            out = self.model(x)
            loss = self.loss_fn(out, y)
        else:
            loss = _check_loss_value(self.compute_loss(self.model, batch))
        loss.backward()
        if snap is not None:
            named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
            skipped = self.nonfinite.observe(self.global_step, loss, named, *snap)
            if self.nonfinite.due():
                self._check_nonfinite()
        else:
            self.nonfinite.skip = None
            skipped = torch.zeros((), dtype=torch.bool, device=loss.device)
        if not getattr(self, "_grad_paths_checked", False):
            self._check_grad_paths()
        if self.compute_loss is not None:  # only compute_loss knows what a prediction is: no accuracy
            return {"loss": loss.detach().reshape(()), "skipped": skipped}
        with torch.no_grad():
            if out.dim() == 2 and y.dim() == 1:
                correct = (out.argmax(dim=1) == y).sum()
            else:  # not a classification target: no accuracy
                correct = torch.zeros((), dtype=torch.int64, device=out.device)
        count = torch.full((), y.shape[0], dtype=torch.int64, device=y.device)  # a fill, not a host copy
        return {"loss": loss.detach(), "correct": correct, "count": count, "skipped": skipped}

    def _check_grad_paths(self) -> None:
        """After the first backward: a masked weight with a gradient but no score gradient was used
        outside its module's masked forward (e.g. ``F.linear(x, module.weight)``), so its mask
        never applied. Refuse it by name rather than train a layer that is not really pruned."""
        self._grad_paths_checked = True
        for name, mod in zip(self.module_names, self.modules):
            if mod.scores.requires_grad and mod.weight.grad is not None and mod.scores.grad is None:
                self._zero_grad()
                raise ValueError(f"model: the weight of {name!r} ({type(mod).__name__}) is used outside its "
                                 f"masked forward, so its mask would not apply; exclude it from pruning "
                                 f"(exclude=[{name!r}])")

    @torch.no_grad()
    def _snapshot_buffers(self):
        """Copies of the buffers a training forward changes (norm running statistics)."""
        bufs = [b for _, b in self.model.named_buffers() if b.dtype != torch.bool]
        snap = getattr(self, "_buffer_copies", None)
        if snap is None or len(snap[0]) != len(bufs) or any(a is not b for a, b in zip(snap[0], bufs)):
            snap = self._buffer_copies = (bufs, [torch.empty_like(b) for b in bufs])
        if bufs:
            torch._foreach_copy_(snap[1], bufs)
        return snap

    def _check_nonfinite(self) -> int:
        """Host read of the guard (see the module docstring); raises :class:`NonFiniteError` over
        its budget, after clearing the gradients. Returns the non-finite steps seen so far."""
        try:
            return self.nonfinite.check()
        except NonFiniteError:
            self._zero_grad()
            raise

    @property
    def _skip(self) -> Optional[torch.Tensor]:
        """The current pass's device-side skip flag (None without the guard)."""
        return self.nonfinite.skip if self.nonfinite_guard else None

    # -- masks --------------------------------------------------------------------------
    def masks(self) -> List[torch.Tensor]:
        """The masks of the masked modules, in registration order (the buffers themselves)."""
        return [m.mask for m in self.modules]

    def sparsity(self) -> float:
        """Fraction of prunable weights currently masked out (0.0 without masked modules); syncs."""
        total = sum(m.mask.numel() for m in self.modules)
        if total == 0:
            return 0.0
        kept = int(sum(m.mask.sum() for m in self.modules))
        return 1.0 - kept / total

    @property
    def empty_layers(self) -> List[str]:
        """Masked layers whose mask kept no weight at the last check (layer collapse; see ``_collapse``)."""
        return list(self.collapse.empty)

    @torch.no_grad()
    def _set_masks(self, new_masks: Sequence[torch.Tensor]) -> None:
        apply_masks(self.modules, new_masks)
        self.collapse.after_change(self.module_names, self.modules, self.global_step)

    # -- step ---------------------------------------------------------------------------
    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _sgd_step(self, group: str, batch) -> Dict[str, torch.Tensor]:
        """Plain training step: forward/backward on ``batch``, one SGD update of ``group``."""
        batch = self._check_batch(batch, "batch")
        out = self._forward_backward(batch)
        g = self.param_groups[group]
        g.step(g.lr * self.lr_factor(), skip=self._skip)
        self._zero_grad()
        self.step_count += 1
        self.global_step += 1
        return out

    def _freeze_scores(self) -> None:
        """For algorithms that never train scores: a fixed configuration set once at construction,
        so the masked modules skip the score gradient (not a per-phase toggle)."""
        for s in self._scores():
            s.requires_grad_(False)

    # -- state --------------------------------------------------------------------------
    def _extra_state(self) -> Dict[str, object]:
        return {}

    def _load_extra_state(self, sd: Dict[str, object]) -> None:
        pass

    def state_dict(self, include_model: bool = True) -> Dict[str, object]:
        """Everything needed to resume exactly: counters, optimiser buffers, masks, round/phase state.

        Raises :class:`NonFiniteError` first if a non-finite step is pending (nothing diverged is
        saved). With ``include_model`` (default) the model's own state dict (weights, scores, masks, norm
        statistics) is included too, under ``"model"``.
        """
        self._check_nonfinite()
        sd: Dict[str, object] = {
            "algorithm": self.name,
            "step_count": self.step_count,
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "optimizers": {k: g.state_dict() for k, g in self.param_groups.items()},
            "masks": [m.clone() for m in self.masks()],
        }
        sd.update(self._extra_state())
        if include_model:
            sd["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, object]) -> None:
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(sd).__name__}")
        if sd.get("algorithm") != self.name:
            raise ValueError(f"state_dict: holds algorithm {sd.get('algorithm')!r}, this is {self.name!r}")
        opts = sd["optimizers"]
        if set(opts) != set(self.param_groups):
            raise ValueError(f"state_dict: optimisers {sorted(opts)} do not match {sorted(self.param_groups)}")
        self._load_extra_state(sd)  # may rebuild groups (e.g. a phase switch) before buffers load
        if "model" in sd:
            self.model.load_state_dict(sd["model"])
        for k, g in self.param_groups.items():
            g.load_state_dict(opts[k])
        masks = sd["masks"]
        if len(masks) != len(self.modules):
            raise ValueError(f"state_dict: expected {len(self.modules)} masks, got {len(masks)}")
        self._set_masks([mk.to(m.mask.device) for mk, m in zip(masks, self.modules)])
        self.step_count = int(sd["step_count"])
        self.global_step = int(sd["global_step"])
        self.total_steps = sd["total_steps"]

    def __repr__(self) -> str:
        groups = ", ".join(repr(g) for g in self.param_groups.values())
        return f"{type(self).__name__}(step={self.step_count}, groups=[{groups}])"

