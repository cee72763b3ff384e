"""Layer collapse, watched from inside an algorithm.

A global mask at extreme sparsity can keep no weight of some layer (docs/results.md, "Layer
collapse": at 98.2% BiP's first score steps emptied 6-7 of ResNet-8's 8 layers). A layer on every
path from input to output then cuts the output off from the input: accuracy falls to chance and no
gradient reaches the other layers again. The CLI reports it per epoch; a user of the Python API who
never calls ``sparsity_report`` would not hear of it. So every algorithm checks its masks after a
mask change, at the 1st, 2nd, 4th, 8th, ... change and then every ``EVERY``-th (collapse happens in
the first steps, and the checks cost one device sync each: about log2(T) + T / EVERY syncs in T
steps), records the empty layers in ``algorithm.empty_layers`` and warns once per layer.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Set

import torch
from torch import nn

__all__ = ["CollapseWatch", "EVERY"]

EVERY = 256  # mask changes between checks once the powers of two are sparser than this


class CollapseWatch:
    """Counts mask changes; on the scheduled ones, finds the layers whose mask keeps nothing."""

    def __init__(self) -> None:
        self.changes = 0
        self.checks = 0
        self.empty: List[str] = []
        self.warned: Set[str] = set()  # shared with the engine's per-epoch mask_state: one warning per layer

    def due(self) -> bool:
        n = self.changes
        return n > 0 and (n & (n - 1) == 0 or n % EVERY == 0)

    def after_change(self, names: Sequence[str], modules: Sequence[nn.Module], step: int) -> None:
        self.changes += 1
        if not modules or not self.due():
            return
        self.checks += 1
        dev = modules[0].mask.device
        kept = torch.stack([m.mask.any().to(dev) for m in modules]).tolist()  # one sync
        self.empty = [n for n, k in zip(names, kept) if not k]
        new = [n for n in self.empty if n not in self.warned]
        if new:
            self.warned.update(new)
            warnings.warn(f"layer collapse: at mask update {self.changes} (after {step} completed steps) the masks "
                          f"keep no weight of {', '.join(new)} "
                          f"({len(self.empty)} of {len(modules)} masked layers empty); a layer on every path cuts "
                          f"the output off from the input and no gradient reaches it again. A lower score learning "
                          f"rate or a layer-wise structure avoids it (docs/results.md, 'Layer collapse')",
                          UserWarning, stacklevel=2)
