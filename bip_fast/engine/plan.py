"""The plan of a run: a list of segments, each some epochs of one algorithm.

- ``pretrain``: ``dense`` (Dense, plain model) -> ``model.pt`` is the plain state dict.
- ``prune --method bip|omp|snip|grasp|synflow|gmp``: the method's segment (:mod:`.baselines`),
  starting from ``--pretrained``. Without ``--pretrained`` a dense segment of
  ``--pretrain-epochs`` (default: the dense schedule) runs first (not for SNIP/GraSP/SynFlow).
- ``prune --method hydra``: ``hydra_prune`` (the score phase), then ``hydra_finetune``.
- ``prune --method imp``: round 0 (dense, without ``--pretrained``), then rounds 1..R (from
  ``--pretrained``: rewinding to the pretrained run's ``rewind.pt``).
- ``finetune``: Dense SGD of the masked model under its fixed masks.

The full description is in :mod:`bip_fast.engine.loop`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..pruning import IMP
from . import baselines
from .hparams import METHOD_DEFAULTS, RunConfig

__all__ = ["Segment", "plan_segments"]


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
    pre = p.pretrain_epochs if p.pretrain_epochs is not None else METHOD_DEFAULTS["dense"]["epochs"]
    if c == "pretrain":
        return [Segment("dense", "dense", t.epochs)]
    if c == "finetune":
        return [Segment("finetune", "dense", t.epochs)]
    if c != "prune":
        raise ValueError(f"command: {c!r} has no training plan")
    have = bool(cfg.model.pretrained)
    segs: List[Segment] = []
    if p.method == "imp":
        if (cfg.prune.structure or "global") != "global":
            raise ValueError(f"structure: IMP prunes by global magnitude only, got {cfg.prune.structure!r}")
        rounds = IMP.rounds_for(1.0 - p.sparsity, p.imp_rate)
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
