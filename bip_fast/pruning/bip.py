"""BiP: pruning as bi-level optimisation (SPEC §3-4, and the authors' effective update, SPEC §6)."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ._bn_correction import attach_bn_correction
from ._scores import SCORE_INITS, UNIT_STRUCTURES, UnitScores, init_scores
from .base import Algorithm, SGDGroup, _project_into
from ._validate import Batch, _check_choice, _check_number, _check_structure, check_target

__all__ = ["BiP", "init_scores", "scaled_score_lr", "score_lr_note", "PAPER_HPARAMS", "PAPER_SCORE_STEPS",
           "MEASURED_SCORE_STEPS", "measured_length"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

# The paper's exact hyper-parameters (SPEC §4): BiP(model, s, **PAPER_HPARAMS) reproduces its text.
PAPER_HPARAMS = {"lr": 0.01, "score_lr": 0.1, "gamma": 1.0, "weight_decay": 1e-4}
# Steps of the paper's BiP schedule: 100 epochs of 391 steps (CIFAR-10, batch 128).
PAPER_SCORE_STEPS = 100 * 391
# The BiP schedule lengths (steps) the score-lr rule was measured at, and only those: the CIFAR-10
# ResNet-8 cpu preset's 349 steps (score lr 11.2) and its 2x schedule, 698 steps (5.6), in
# benchmarks/results/bip-ablation-cpu-cpu (one seed, test split; docs/equal_accuracy.md §4), and the
# paper's 39,100 (its own 0.1). Lengths in between were not measured. A schedule within
# MEASURED_TOLERANCE of one of them counts as that length (39,000 steps of 390 is the paper's).
MEASURED_SCORE_STEPS = (349, 698, PAPER_SCORE_STEPS)
MEASURED_TOLERANCE = 0.05


def scaled_score_lr(total_steps: Optional[int], base: float = 0.1, paper_steps: int = PAPER_SCORE_STEPS) -> float:
    """Score learning rate that keeps the paper's product of score lr and steps constant.

    Returns ``base * paper_steps / total_steps`` (``base`` when ``total_steps`` is None): the
    paper's 0.1 on its own schedule (CIFAR-10, batch 128, 100 epochs x 391 = 39,100 steps), and on
    any other schedule the rate whose product with the step count is the same 0.1 x 39,100 = 3,910.
    Why: the scores move by roughly lr_s x (sum of G_s over the schedule); in a schedule shortened
    by a factor f the same lr_s moves them f times less, and the mask barely changes.

    Where it was measured: CIFAR-10, ResNet-8 on 4,000 images, batch 128, at 349 and 698 BiP
    steps (score lr 11.2 and 5.6; one seed, decided on the test split: docs/equal_accuracy.md,
    benchmarks/results/bip-ablation-cpu-cpu) and, by the paper, at 39,100 steps (0.1): those
    lengths (``MEASURED_SCORE_STEPS``, each within ``MEASURED_TOLERANCE``) and no others. At any
    other length it is an interpolation or extrapolation (391 at 10 steps, 0.78 at 5,000, 0.008 at
    500,000), and a dataset or batch size far from CIFAR-10's may want another product;
    :func:`score_lr_note` says so, and ``BiP`` warns when it resolves such a value."""
    if total_steps is None:
        return float(base)
    return float(base) * paper_steps / int(total_steps)


def measured_length(total_steps: Optional[int]) -> bool:
    """Whether the score-lr rule was measured at a schedule of ``total_steps`` (within
    ``MEASURED_TOLERANCE`` of one of ``MEASURED_SCORE_STEPS``)."""
    return total_steps is not None and any(abs(total_steps - n) <= MEASURED_TOLERANCE * n
                                           for n in MEASURED_SCORE_STEPS)


def score_lr_note(total_steps: Optional[int]) -> Optional[str]:
    """Why :func:`scaled_score_lr` of ``total_steps`` was not measured (None at a measured length,
    or without ``total_steps``)."""
    if total_steps is None or measured_length(total_steps):
        return None
    lengths = ", ".join(f"{n:,}" for n in MEASURED_SCORE_STEPS)
    return (f"score_lr=None resolves to {scaled_score_lr(total_steps):.4g} = 0.1 x {PAPER_SCORE_STEPS} / "
            f"{total_steps} steps; the rule was measured only at schedules of {lengths} steps (score lr "
            f"{', '.join(f'{scaled_score_lr(n):.3g}' for n in MEASURED_SCORE_STEPS)}); pass score_lr explicitly "
            f"if that is not what you want")


def _add_upper(out: Dict[str, torch.Tensor], up: Dict[str, torch.Tensor]) -> None:
    """The upper pass's loss (and accuracy count, where the pass has one) beside the lower's."""
    out["upper_loss"] = up["loss"]
    if "correct" in up:
        out["upper_correct"] = up["correct"]


SCHEDULES = ("alternating", "fused")
_BEFORE = {"mask_freeze": 0.0, "bn_correction": False, "unit_scores": False}  # what a checkpoint made before the option meant

VARIANTS = ("paper", "official")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class BiP(Algorithm):
    """Bi-level pruning (BiP). One :meth:`step` is one iteration of SPEC §4 (Algorithm A1).

    ``step(lower_batch, upper_batch)``: the lower batch B_β drives the weight (θ) step, the upper
    batch B_α the score (mask) step; with ``upper_batch=None`` the lower batch serves both.
    Returns the lower pass's ``loss/correct/count`` (plus ``upper_loss`` for two-pass schedules).
    With ``compute_loss=f`` both passes compute ``f(model, batch)`` on batches of any structure
    (see :mod:`bip_fast.pruning.base`) and the metrics are the losses only.

    Variants and schedules:

    - ``variant="paper", schedule="alternating"`` (default, Gauss-Seidel, 2 forward/backward):
      forward/backward on B_β at (m_t, θ_t) -> SGD step on weights, biases and norm parameters
      (momentum, ``weight_decay``, rate ``lr``) -> forward/backward on B_α at (m_t, θ_{t+1}) ->
      SGD step on the scores with G_s = sgn(s)·(θ⊙g − (1/γ)·m⊙g⊙g) (rate ``score_lr``, weight
      decay ``score_weight_decay``, 0 by default) -> m_{t+1} = projection of s_{t+1}. Both passes
      run in train mode, so norm-layer running statistics see both batches.
    - ``variant="paper", schedule="fused"`` (Jacobi, 1 forward/backward): one forward/backward
      on B_β at (m_t, θ_t) gives both gradients; both updates; projection. ``upper_batch`` unused.
    - ``variant="official"``: the effective update of the authors' code (SPEC §6), in 2
      forward/backward passes instead of 4+3. Implementation choice: the score *is* the weight,
      but storage is not aliased (aliasing would break under ``.to()``, DDP broadcasts and
      dtype changes). Instead the mask is the projection of |θ| (global magnitude top-K for
      ``structure="global"``), recomputed after each level's update (the authors recompute it
      at every forward, which gives the same masks), and before the upper pass ``scores`` is
      overwritten with a copy of θ while ``ig_scale`` is 0, so the module's score gradient is
      sgn(θ)·θ⊙g = |θ|⊙g, the authors' ∂ℓ/∂s (also on pruned entries, where θ ≠ 0). So
      ``module.scores`` is a copy of θ as of the last upper pass; θ itself is the score.
      Per iteration, with one learning rate η = ``lr`` for both levels (``score_lr`` is unused,
      as in the authors' code) and four momentum buffers per weight (each of the two optimisers
      holds one for the weight slot and one for the score slot of the same storage):

      1. forward/backward on B_β at (m_t, θ_t); optimiser 1, in parameter order per layer:
         θ ← SGD(θ, m⊙g); biases/norms/unpruned layers ← SGD(x, ∂ℓ/∂x); then from the second
         iteration on θ ← SGD(θ, 0) with the score-slot buffer (the authors' zeroed score grad
         still receives momentum and weight decay); m' = top-K|θ|.
      2. forward/backward on B_α at (m', θ) with scores = θ; optimiser 2: θ ← SGD(θ, 0)
         (weight slot); biases and unpruned layer weights ← SGD(x, 0); θ ← SGD(θ, G − lr2·G²)
         with G = |θ|⊙g (score slot); norm parameters ← SGD(x, g − lr2·g²); m_{t+1} = top-K|θ|.

      ``score_lr``, ``score_weight_decay``, ``gamma`` and ``score_init`` do not apply here.
      Not reproduced: the extra forwards' BatchNorm running-statistics updates (the authors run
      3 train-mode forwards on B_α per iteration, we run 1) and the authors' per-epoch schedules
      (pass ``total_steps`` for a per-step cosine over both levels).

    Defaults (bip_fast's, measured in docs/equal_accuracy.md): ``lr=0.1`` (the dense training
    rate; the authors' code also runs both levels at 0.1) and ``score_lr=None``, which means
    :func:`scaled_score_lr` of ``total_steps``: 0.1 x 39,100 / total_steps, the paper's score rate on
    its own 100-epoch schedule and the same product of rate and steps on a shorter one (0.1 without
    ``total_steps``). The paper's text (lr 0.01, score lr 0.1 at any length) is
    ``BiP(model, sparsity, **PAPER_HPARAMS)``. A UserWarning names the resolved value when
    ``total_steps`` is not a schedule length the rule was measured at (``MEASURED_SCORE_STEPS``:
    349, 698 and 39,100 steps, within 5%).

    Target: ``sparsity`` (the fraction of prunable weights removed), or with ``structure="group"``
    a budget, ``macs=f`` or ``params=f``: at most the fraction ``f`` of the dense model's MACs (on
    the example input given to :func:`bip_fast.attach_groups`) or parameters, the channels of all
    coupled groups ranked together by score mass per unit of cost after every score update
    (:mod:`bip_fast.masks.budget`); exactly one of the three.

    ``bn_correction=True`` (paper variant): the score gradient of every filter that keeps no weight
    and feeds a BatchNorm is multiplied by sqrt(eps / (σ² + eps)), σ² the batch variance that
    filter's output would have switched on (:mod:`bip_fast.pruning._bn_correction`): the zero
    channel a pruned filter outputs is normalised by sqrt(eps), which inflates its straight-through
    gradient by about σ/sqrt(eps). Default False (the paper's update).

    ``unit_scores=True`` (paper variant, filter or channel structure): one shared score per filter
    (channel) instead of one per weight, moved by the mean of its weights' score gradients
    (:mod:`bip_fast.pruning._scores`). Default False (the paper's per-weight scores).

    ``mask_freeze=f`` (paper variant, with ``total_steps``): the last fraction ``f`` of the schedule
    keeps the mask fixed and trains θ only (the lower level: one forward/backward per step), so the
    filters or weights the mask settles on are trained before the end (0.0, the paper's: the mask
    moves at every step).

    Scores are initialised by :func:`init_scores` (``score_init="magnitude"``: |θ|, so the first
    mask is the magnitude mask of the pretrained model; ``"hydra"``: Hydra's scaled |θ|).
    ``gamma`` sets ``module.ig_scale = 1/gamma`` (paper variant); ``gamma=math.inf`` disables the
    implicit-gradient term. ``lr2`` is the official variant's IG coefficient.
    """

    name = "bip"

    def __init__(
        self,
        model: nn.Module,
        sparsity: Optional[float] = None,
        *,
        macs: Optional[float] = None,
        params: Optional[float] = None,
        structure: str = "global",
        schedule: str = "alternating",
        variant: str = "paper",
        lr: float = 0.1,
        score_lr: Optional[float] = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        score_weight_decay: float = 0.0,
        gamma: float = 1.0,
        lr2: float = 1e-4,
        total_steps: Optional[int] = None,
        score_init: str = "magnitude",
        mask_freeze: float = 0.0,
        bn_correction: bool = False,
        unit_scores: bool = False,
        n: int = 2,
        m: int = 4,
        loss_fn=None,
        compute_loss=None,
        include=None,
        exclude=None,
    ) -> None:
        self.sparsity_target, self.budget = check_target(sparsity, macs, params, structure)
        self.density = 1.0 - (self.sparsity_target or 0.0)  # unused under a budget
        self.structure = structure
        _check_structure(structure, self.sparsity_target or 0.0, n, m)
        self.n, self.m = n, m
        self.schedule = _check_choice(schedule, "schedule", SCHEDULES)
        self.variant = _check_choice(variant, "variant", VARIANTS)
        if variant == "official" and schedule != "alternating":
            raise ValueError(f"schedule: the official variant is alternating only, got {schedule!r}")
        _check_choice(score_init, "score_init", SCORE_INITS)
        self.gamma = _check_number(gamma, "gamma", low=0.0, low_inclusive=False)
        self.lr2 = _check_number(lr2, "lr2", low=0.0)
        self.mask_freeze = _check_number(mask_freeze, "mask_freeze", low=0.0, high=1.0, high_inclusive=False)
        if self.mask_freeze and (variant != "paper" or total_steps is None):
            raise ValueError("mask_freeze: needs variant='paper' and total_steps (the mask is fixed for the last "
                             f"fraction mask_freeze of total_steps), got variant={variant!r}, total_steps={total_steps!r}")
        for k, on in (("bn_correction", bn_correction), ("unit_scores", unit_scores)):
            if not isinstance(on, bool):
                raise TypeError(f"{k}: expected a bool, got {type(on).__name__}")
            if on and variant != "paper":
                raise ValueError(f"{k}: applies to variant='paper' (the official variant's score is the weight)")
        if unit_scores and structure not in UNIT_STRUCTURES:
            raise ValueError(f"unit_scores: shares one score per filter or channel (structure='filter' or "
                             f"'channel'), got structure={structure!r}")
        super().__init__(model, total_steps=total_steps, loss_fn=loss_fn, compute_loss=compute_loss,
                         include=include, exclude=exclude, structure=structure)
        if score_lr is None:
            score_lr = scaled_score_lr(self.total_steps)
            note = score_lr_note(self.total_steps) if variant == "paper" else None
            if note:
                warnings.warn(f"BiP: {note}", UserWarning, stacklevel=2)
        self.score_lr = _check_number(score_lr, "score_lr", low=0.0)
        if variant == "paper" and structure == "global" and self.density <= 0.05 + 1e-9 and self.score_lr > 1.0:
            warnings.warn(f"BiP: score_lr {self.score_lr:.4g} at {1 - self.density:.1%} global sparsity: a score lr "
                          "of 11.2 emptied whole layers at 96.5-98.2% within 2 steps where 0.1 did not (docs/results.md, "
                          "'Layer collapse'); sparsity_report(model)['empty_layers'] tells", UserWarning, stacklevel=2)
        # Global projection reuses the radix histogram computed by the score update's launch.
        self._hist = structure == "global"

        self.bn_correction, self.unit_scores = bn_correction, unit_scores
        if variant == "paper":
            init_scores(self.modules, score_init)
            self._units = UnitScores(self.modules, structure) if unit_scores else None
            if bn_correction:
                self._bn_hooks = attach_bn_correction(self)
            ig = 0.0 if math.isinf(self.gamma) else 1.0 / self.gamma
            # Under data parallelism the IG term must use the rank-averaged gradient: the
            # square of the mean, not the mean of per-rank squares. Then the kernel computes
            # only sgn(s)·θ⊙g (linear in g, so averaging is exact) and the term is added after
            # the all-reduce from weight.grad = m⊙ḡ, since m⊙ḡ⊙ḡ = (m⊙ḡ)² for a binary mask.
            self._ig_after_reduce = ig if _world_size() > 1 else 0.0
            for mod in self.modules:
                mod.ig_scale = 0.0 if self._ig_after_reduce else ig
            self.param_groups = {
                "weights": SGDGroup("weights", self._lower_params(), lr, momentum, weight_decay),
                "scores": SGDGroup("scores", self._scores(), score_lr, momentum, score_weight_decay),
            }
            self._project(self._scores())
        else:
            with torch.no_grad():
                for mod in self.modules:
                    mod.ig_scale = 0.0
                    mod.scores.copy_(mod.weight)
            norm_ids = {id(p) for mod in self.model.modules() if isinstance(mod, _NORM_TYPES)
                        for p in mod.parameters(recurse=False)}
            others = self._others()
            self._norm_params = [p for p in others if id(p) in norm_ids]
            self._plain_params = [p for p in others if id(p) not in norm_ids]
            w = self._weights()
            # Optimiser k's buffers for (weight slot, score slot, other params); all at rate `lr`.
            self.param_groups = {
                "opt1_weights": SGDGroup("opt1_weights", w, lr, momentum, weight_decay),
                "opt1_scores": SGDGroup("opt1_scores", w, lr, momentum, weight_decay),
                "opt1_others": SGDGroup("opt1_others", others, lr, momentum, weight_decay),
                "opt2_weights": SGDGroup("opt2_weights", w, lr, momentum, weight_decay),
                "opt2_scores": SGDGroup("opt2_scores", w, lr, momentum, weight_decay),
                "opt2_plain": SGDGroup("opt2_plain", self._plain_params, lr, momentum, weight_decay),
                "opt2_norms": SGDGroup("opt2_norms", self._norm_params, lr, momentum, weight_decay),
            }
            self._zeros: Optional[torch.Tensor] = None
            self._project(w)

    # -------------------------------------------------------------------------------------
    def _project(self, scores, hist1: Optional[torch.Tensor] = None) -> None:
        _project_into(self, scores, self.density, self.structure, self.n, self.m, hist1, budget=self.budget)

    def step(self, batch: Batch, batch2: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """One BiP iteration (see the class docstring); returns the lower pass's metrics."""
        lower = self._check_batch(batch, "batch")
        upper = lower if batch2 is None else self._check_batch(batch2, "batch2")
        f = self.lr_factor()
        frozen = self.mask_frozen()
        self._scores_trainable(not frozen)
        if frozen:  # the lower level only: θ under the fixed mask
            out = self._forward_backward(lower)
            self.param_groups["weights"].step(self.param_groups["weights"].lr * f, skip=self._skip)
        elif self.variant == "official":
            out = self._step_official(lower, upper, f)
        elif self.schedule == "fused":
            out = self._forward_backward(lower)
            self._add_ig_after_reduce()
            self.param_groups["weights"].step(self.param_groups["weights"].lr * f, skip=self._skip)
            hist = self.param_groups["scores"].step(self.param_groups["scores"].lr * f, want_hist=self._hist,
                                                    skip=self._skip)
            self._project(self._scores(), hist)
        else:
            out = self._forward_backward(lower)
            self.param_groups["weights"].step(self.param_groups["weights"].lr * f, skip=self._skip)
            up = self._forward_backward(upper)
            self._add_ig_after_reduce()
            hist = self.param_groups["scores"].step(self.param_groups["scores"].lr * f, want_hist=self._hist,
                                                    skip=self._skip)
            self._project(self._scores(), hist)
            _add_upper(out, up)
        self._zero_grad()
        self.step_count += 1
        self.global_step += 1
        return out

    def remove_hooks(self) -> None:
        """Take ``bn_correction``'s and ``unit_scores``' hooks off the model (they hold no state worth saving)."""
        for k in ("_bn_hooks", "_units"):
            if getattr(self, k, None) is not None:
                getattr(self, k).remove()
                setattr(self, k, None)

    def mask_frozen(self) -> bool:
        """Whether the next step keeps the mask fixed: the last ``mask_freeze`` of ``total_steps``
        (from step ``round((1 - mask_freeze) * total_steps)`` on) trains θ only, one forward/backward
        on the lower batch per step, no score update, no projection."""
        return bool(self.mask_freeze) and self.step_count >= round((1.0 - self.mask_freeze) * self.total_steps)

    def _scores_trainable(self, on: bool) -> None:
        """Scores skip their gradient while the mask is frozen (and get it back on a reload before)."""
        if self.variant == "paper" and self.modules and self.modules[0].scores.requires_grad != on:
            for s in self._scores():
                s.requires_grad_(on)

    @torch.no_grad()
    def _add_ig_after_reduce(self) -> None:
        """G_s −= ig·sgn(s)·(m⊙ḡ)² from the all-reduced weight gradient (data-parallel runs only)."""
        ig = getattr(self, "_ig_after_reduce", 0.0)
        if not ig:
            return
        for mod in self.modules:
            if mod.scores.grad is None or mod.weight.grad is None:
                continue
            wg = mod.weight.grad.to(torch.float32)
            sgn = torch.where(mod.scores < 0, -1.0, 1.0)
            mod.scores.grad.sub_((ig * sgn * wg * wg).to(mod.scores.grad.dtype))
        if getattr(self, "_units", None) is not None:  # the term just added, averaged over each unit too
            self._units.average()

    def _zeros_like(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """Zero 'gradients' as views of one shared zero tensor (the authors' zeroed .grad)."""
        if not params:
            return []
        need = max(p.numel() for p in params)
        dev, dt = params[0].device, params[0].dtype
        z = self._zeros
        if z is None or z.numel() < need or z.device != dev or z.dtype != dt:
            z = self._zeros = torch.zeros(need, device=dev, dtype=dt)
        return [z[: p.numel()].view(p.shape).to(p.dtype) for p in params]

    def _step_official(self, lower: Batch, upper: Batch, f: float) -> Dict[str, torch.Tensor]:
        g = self.param_groups
        w = self._weights()
        # Level 1: θ-step on B_β at (m_t, θ_t) (optimiser 1 over every parameter).
        out = self._forward_backward(lower)
        sk = self._skip
        g["opt1_weights"].step(g["opt1_weights"].lr * f, skip=sk)
        g["opt1_others"].step(g["opt1_others"].lr * f, skip=sk)
        if self.global_step > 0:  # the score slot has a (zeroed) .grad from the 2nd iteration on
            hist = g["opt1_scores"].step(g["opt1_scores"].lr * f, self._zeros_like(w), want_hist=self._hist,
                                         skip=sk)
        else:
            hist = None
        self._project(w, hist)
        # Level 2: m-step on B_α at (m', θ'), the score being the weight itself.
        with torch.no_grad():
            for mod in self.modules:
                mod.scores.copy_(mod.weight if sk is None else torch.where(sk, mod.scores, mod.weight))
        up = self._forward_backward(upper)
        sk = self._skip
        with torch.no_grad():
            gs = []
            for mod in self.modules:
                gsc = mod.scores.grad.to(mod.weight.dtype)
                gs.append(gsc - self.lr2 * gsc * gsc)
            gn = [None if p.grad is None else p.grad - self.lr2 * p.grad * p.grad for p in self._norm_params]
        g["opt2_weights"].step(g["opt2_weights"].lr * f, self._zeros_like(w), skip=sk)
        g["opt2_plain"].step(g["opt2_plain"].lr * f, self._zeros_like(self._plain_params), skip=sk)
        hist = g["opt2_scores"].step(g["opt2_scores"].lr * f, gs, want_hist=self._hist, skip=sk)
        g["opt2_norms"].step(g["opt2_norms"].lr * f, gn, skip=sk)
        self._project(w, hist)
        _add_upper(out, up)
        return out

    def _extra_state(self) -> Dict[str, object]:
        return {"variant": self.variant, "schedule": self.schedule, "structure": self.structure,
                "sparsity": self.sparsity_target, "budget": None if self.budget is None else str(self.budget),
                "mask_freeze": self.mask_freeze, "bn_correction": self.bn_correction,
                "unit_scores": self.unit_scores}

    def _load_extra_state(self, sd: Dict[str, object]) -> None:
        for k, mine in self._extra_state().items():
            if sd.get(k, _BEFORE.get(k)) != mine:  # keys newer than a checkpoint: their value before they existed
                raise ValueError(f"state_dict: {k}={sd.get(k)!r} does not match this BiP's {k}={mine!r}")
