"""The plan of a run: a list of segments, each some epochs of one algorithm (``bip_fast.pruning``).

- ``pretrain``: ``dense`` (Dense, plain model) -> ``model.pt`` is the plain state dict; the state
  at the start of epoch ``--rewind-epoch`` (default 3) is kept in ``rewind.pt`` for IMP.
- ``prune --method bip|omp|snip|grasp|synflow|gmp``: the method's segment (:mod:`.baselines`),
  starting from ``--pretrained`` (a model.pt, checkpoint.pt or run folder). Without
  ``--pretrained`` a dense segment of ``--pretrain-epochs`` (default: the dataset's dense
  schedule, :func:`.sections.dense_epochs`, e.g. 160 epochs at lr 0.1 on CIFAR) runs first in
  the same run folder (not for SNIP/GraSP/SynFlow).
- ``prune --method hydra``: ``hydra_prune`` (``--hydra-score-epochs`` of score training), then
  ``hydra_finetune`` (``Hydra.finetune()``, ``--epochs`` of weight training under the mask).
- ``prune --method imp``: without ``--pretrained``, round 0 is dense training inside IMP and the
  rewind point is the start of epoch ``--rewind-epoch`` (lottery tickets with rewinding); with
  ``--pretrained RUN`` there is no round 0: round 1 prunes by the converged weights' magnitudes and
  every round rewinds to the early weights RUN's ``pretrain`` kept in ``rewind.pt`` (refused
  without one, unless ``--rewind-to-pretrained`` asks to rewind to the pretrained weights). Then
  rounds 1..R (``IMP.next_round()``: prune 20% (``--imp-rate``) of the remaining weights, rewind,
  full retraining schedule) with R = IMP.rounds_for(1 - sparsity): the first round whose density
  is at most the target (0.8^R <= 1 - sparsity); round R prunes less, so that the run lands
  exactly on ``--sparsity`` (``IMP(sparsity=...)``). ``--rounds R`` runs the paper's fixed series
  instead: R rounds of ``--imp-rate`` each, ending at sparsity 1 - 0.8^R. The plan gives the
  sparsity after each round. Each round ends with ``round_RR.pt`` (model, masks, accuracy).
- ``finetune --checkpoint PATH``: Dense SGD of the masked model under its fixed masks.

How a segment runs (per epoch, checkpoints, resume) is in :mod:`bip_fast.engine.loop`.
:func:`describe_plan` is the one line a run prints before it starts: every segment with its
epochs and steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..pruning import IMP
from ..pruning.bip import MEASURED_SCORE_STEPS, PAPER_SCORE_STEPS, scaled_score_lr, score_lr_note
from . import baselines
from .hparams import RunConfig
from .sections import dense_epochs

__all__ = ["Segment", "plan_segments", "describe_plan", "resolved_score_lr"]


@dataclass
class Segment:
    """``epochs`` epochs of algorithm ``kind``; ``transition`` is applied to the previous
    segment's algorithm object on entry ("next_round", "finetune") instead of building a new one."""

    name: str
    kind: str
    epochs: int
    transition: Optional[str] = None
    round: Optional[int] = None

    def to_dict(self):
        return dict(name=self.name, kind=self.kind, epochs=self.epochs, transition=self.transition,
                    round=self.round)


def plan_segments(cfg: RunConfig) -> List[Segment]:
    """The segments of a (resolved) config's run; see the module docstring."""
    c, p, t = cfg.command, cfg.prune, cfg.train
    pre = p.pretrain_epochs if p.pretrain_epochs is not None else dense_epochs(cfg.data.dataset)
    if c == "pretrain":
        return [Segment("dense", "dense", t.epochs)]
    if c == "finetune":
        return [Segment("finetune", "dense", t.epochs)]
    if c != "prune":
        raise ValueError(f"command: {c!r} has no training plan")
    have = bool(cfg.model.pretrained)
    segs: List[Segment] = []
    if p.method == "imp":
        rounds = (p.rounds if p.rounds is not None else IMP.rounds_for(_budget(p)[1], p.imp_rate) if _budget(p)
                  else IMP.rounds_for(1.0 - p.sparsity, p.imp_rate))
        if not have:
            if p.rewind_epoch >= t.epochs:
                raise ValueError(f"rewind_epoch: must be < epochs ({t.epochs}) so that round 0 reaches the "
                                 f"rewind point, got {p.rewind_epoch}")
            segs.append(Segment("imp_round00", "imp", t.epochs, round=0))
        for r in range(1, rounds + 1):
            segs.append(Segment(f"imp_round{r:02d}", "imp", t.epochs, "next_round", round=r))
        return segs
    if not have and p.method not in baselines.AT_INIT:  # SNIP/GraSP/SynFlow prune the initialisation
        segs.append(Segment("pretrain", "dense", pre))
    if p.method in ("bip", "omp") + baselines.BASELINES:
        segs.append(Segment(p.method, p.method, t.epochs))
    elif p.method == "hydra":
        if p.hydra_score_epochs > 0:
            segs.append(Segment("hydra_prune", "hydra", p.hydra_score_epochs))
        segs.append(Segment("hydra_finetune", "hydra", t.epochs, "finetune"))
    else:
        raise ValueError(f"method: prune needs bip, imp, omp or hydra, got {p.method!r}")
    return segs


def resolved_score_lr(cfg: RunConfig, total_steps: int) -> float:
    """BiP's score lr for a segment of ``total_steps``: ``--score-lr``, else the rule
    :func:`~bip_fast.pruning.bip.scaled_score_lr`."""
    return cfg.prune.score_lr if cfg.prune.score_lr is not None else scaled_score_lr(total_steps)


def _score_lr_text(cfg: RunConfig, steps: int) -> str:
    if cfg.prune.variant == "official":
        return ", one lr for both levels (official variant)"
    if cfg.prune.score_lr is not None:
        return f", score lr {cfg.prune.score_lr:g}"
    text = f", score lr {scaled_score_lr(steps):.4g} (0.1 x {PAPER_SCORE_STEPS} / {steps} steps)"
    if score_lr_note(steps):
        lengths = "/".join(str(n) for n in MEASURED_SCORE_STEPS)
        text += f", not a measured length ({lengths} steps): set --score-lr"
    return text


def describe_plan(cfg: RunConfig, segments: List[Segment], steps_per_epoch: int, start: int = 0,
                  start_epoch: int = 0) -> str:
    """One line: ``plan: <segment> E epochs x S steps | ... | N epochs, M steps in all``, with the
    dense phase's origin, BiP's resolved score lr, the sparsity after each IMP round and the
    ``--include`` / ``--exclude`` patterns; ``start``/``start_epoch``: where a resumed run
    continues."""
    spe = steps_per_epoch
    p = cfg.prune
    parts: List[str] = []
    i = 0
    while i < len(segments):
        seg = segments[i]
        shape = f"{_count(seg.epochs, 'epoch')} x {_count(spe, 'step')}"
        if seg.kind == "imp" and seg.round:  # rounds 1..R, one entry
            j = i
            while j + 1 < len(segments) and segments[j + 1].kind == "imp":
                j += 1
            n = j - i + 1
            parts.append(f"imp rounds {seg.round}-{segments[j].round} ({_imp_rounds_text(cfg)}; rewinds and "
                         f"retrains) {n} x {shape}")
            i = j + 1
            continue
        if seg.name == "pretrain":
            origin = (f"{cfg.data.dataset}'s dense schedule; --pretrain-epochs N to change it, --pretrained to "
                      f"skip it" if p.pretrain_epochs is None else "--pretrain-epochs")
            parts.append(f"dense phase {shape} ({origin})")
        elif seg.kind == "imp":
            rewind = f", rewind point: start of epoch {p.rewind_epoch}" if p.rewind_epoch is not None else ""
            parts.append(f"imp round 0 (dense) {shape}{rewind}")
        elif seg.kind == "bip":
            frozen = (f", mask fixed for the last {p.mask_freeze:g} of it (weights only)" if p.mask_freeze else "")
            frozen += ", BatchNorm-corrected filter scores" if p.bn_correction else ""
            frozen += f", one score per {p.structure}" if p.unit_scores else ""
            parts.append(f"bip {shape}{_score_lr_text(cfg, seg.epochs * spe)}{frozen}")
        elif seg.name == "hydra_prune":
            parts.append(f"hydra score phase {shape}, score lr {p.score_lr:g}")
        elif seg.name == "hydra_finetune":
            parts.append(f"hydra finetune {shape}")
        elif seg.kind == "dense" and cfg.command == "pretrain":
            rewind = (f", keeps the start of epoch {p.rewind_epoch} for IMP (rewind.pt)"
                      if p.rewind_epoch is not None else "")
            parts.append(f"dense {shape}{rewind}")
        else:
            parts.append(f"{seg.name} {shape}")
        i += 1
    if _budget(p):  # --macs / --params instead of --sparsity
        kind, f = _budget(p)
        parts.append(f"budget --{kind} {f:g} (at most {f:g} of the dense model's {_KIND_WORDS[kind]}, channels ranked "
                     f"across all groups by score per {_KIND_UNIT[kind]}; --sparsity unused)")
    chosen = [f"--{k} {v}" for k, v in (("include", p.include), ("exclude", p.exclude)) if v is not None]
    if chosen:  # which layers are masked (sparsify's include / exclude)
        parts.append(f"layers chosen by {' '.join(chosen)}")
    epochs = sum(s.epochs for s in segments)
    head = "plan"
    if start or start_epoch:
        head += f" (resuming at epoch {start_epoch + 1} of {segments[start].name})"
    return f"{head}: {' | '.join(parts)} | {_count(epochs, 'epoch')}, {_count(epochs * spe, 'step')} in all"


def _imp_rounds_text(cfg: RunConfig) -> str:
    """What IMP's rounds prune: the per-round rate, how the run ends, the sparsity after each round."""
    p = cfg.prune
    if _budget(p):
        kind, f = _budget(p)
        n = IMP.rounds_for(f, p.imp_rate)
        series = [max(f, (1.0 - p.imp_rate) ** r) for r in range(1, n)] + [f]
        return (f"round r keeps at most {1 - p.imp_rate:g}^r of the dense {_KIND_WORDS[kind]}, never below --{kind} "
                f"{f:g}, the last lands on it; {kind} budget after each round {', '.join(f'{x:.4g}' for x in series)}")
    unit = {"filter": "filters of each layer", "group": "channels of each channel group"}.get(
        p.structure or "global", "weights")
    each = f"each prunes {p.imp_rate:g} of the remaining {unit}"
    if p.rounds is not None:
        series = IMP.schedule(rounds=p.rounds, rate=p.imp_rate)
        how = f"fixed series --imp-rate {p.imp_rate:g} --rounds {p.rounds}: {each}"
    else:
        series = IMP.schedule(p.sparsity, p.imp_rate)
        last = 1.0 - (1.0 - series[-1]) / (1.0 - series[-2]) if len(series) > 1 else series[-1]
        near = {"filter": " (as near as whole filters allow)", "group": " (as near as whole channels allow)"}.get(
            p.structure or "global", "")
        how = f"{each}, the last {last:.4g} to land on --sparsity {p.sparsity:g}{near}"
    return f"{how}; sparsity after each round {', '.join(f'{x:.4g}' for x in series)}"


_KIND_WORDS = {"macs": "MACs (on the data's input size)", "params": "parameters"}
_KIND_UNIT = {"macs": "MAC", "params": "parameter"}


def _budget(p) -> Optional[Tuple[str, float]]:
    """(kind, fraction) of --macs / --params, None without a budget."""
    return ("macs", p.macs) if p.macs is not None else ("params", p.params) if p.params is not None else None


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
