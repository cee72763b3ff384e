"""The divergence guard of the algorithms: a NaN/inf step applies no update, decided on the device.

Every training pass reduces its loss and gradients to one "non-finite" flag on the device (one
multi-tensor max-|g| reduction, in the spirit of AMP's found-inf flag). From it, still on the
device and without a host synchronisation:

- ``skip``, the flag handed to :func:`bip_fast.ops.fused_sgd_`, whose kernels then store nothing
  (weights, scores, momentum buffers unchanged; the radix histogram counts the unchanged values,
  so the next top-K projection gives the same masks), and which restores the buffers the forward
  changed (norm running statistics) from a snapshot taken before it;
- a count of non-finite steps (a step counts once, however many of its passes failed), and the
  step, the loss value and the offending tensor of the step that went over the budget;
- stickiness: once more steps were non-finite than ``limit`` allows, every later update is
  skipped as well, so the state stays exactly as it was until the host looks.

The host looks in :meth:`NonFiniteGuard.check` (one read of the count): the algorithms call it
every pass on the CPU (where the read is free), every ``check_every`` passes on an accelerator,
and before anything they change from the host (an IMP round, a GMP cut, ``state_dict()``).
Over the budget it raises :class:`NonFiniteError` naming the step and clears the count, so a
caller that goes on (e.g. at a lower learning rate) trains again from the untouched state.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["NonFiniteError", "NonFiniteGuard"]

DEFAULT_CHECK_EVERY = 64  # passes between host reads on an accelerator


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN/inf loss or gradient; no update was applied.

    ``step``: the algorithm's ``global_step`` of the failed iteration; ``what``: the loss or the
    first parameter with a non-finite gradient; ``count``/``limit``: non-finite steps seen and
    allowed (``limit`` > 0 only when steps may be skipped)."""

    def __init__(self, step: int, what: str, count: int = 1, limit: int = 0) -> None:
        self.step, self.what, self.count, self.limit = step, what, count, limit
        more = f" ({count} non-finite steps, {limit} allowed)" if limit else ""
        super().__init__(f"step {step}: non-finite {what}{more}; no update was applied")


class NonFiniteGuard:
    """Device-side non-finite flag, count and first-over-budget record of one algorithm.

    ``limit``: non-finite steps that are skipped (no update) before :meth:`check` raises.
    ``check_every``: passes between host reads; None (default) reads every pass on the CPU,
    where the read costs nothing, and every 64 passes on an accelerator.
    """

    def __init__(self, limit: int = 0, check_every: Optional[int] = None) -> None:
        self.limit = int(limit)
        self.check_every = check_every
        self.passes = 0
        self.skip: Optional[torch.Tensor] = None  # the current pass's flag
        self._names: List[Tuple[str, ...]] = []
        self._keys: Dict[Tuple[str, ...], int] = {}
        self._dev: Optional[torch.device] = None
        self._step: Optional[int] = None

    def _init(self, device: torch.device) -> None:
        self._dev = device
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.record = torch.full((3,), -1, dtype=torch.int64, device=device)  # step, names key, index
        self.record_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.step_bad = torch.zeros((), dtype=torch.bool, device=device)

    @torch.no_grad()
    def observe(self, step: int, loss: torch.Tensor, named_grads: Sequence[Tuple[str, torch.Tensor]],
                buffers: Sequence[torch.Tensor] = (), saved: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Flag this pass (``step`` = the algorithm's ``global_step``); restores ``buffers`` from
        ``saved`` where the update is skipped. Returns the skip flag (0-dim bool, on the device)."""
        lv = loss.detach().float().reshape(-1)[:1].reshape(())
        if self._dev != lv.device:
            self._init(lv.device)
        named_grads = [(n, g) for n, g in named_grads if g.numel()]
        names = tuple(n for n, _ in named_grads)
        key = self._keys.get(names)
        if key is None:
            key = self._keys[names] = len(self._names)
            self._names.append(names)
        grads = [g for _, g in named_grads]
        if lv.device.type == "cpu":  # min and max catch NaN and +-inf too, ~10x faster than the CPU inf-norm
            peaks = [t.float() for g in grads for t in torch.aminmax(g)]
        else:  # one multi-tensor kernel
            peaks = [t.float() for t in torch._foreach_norm(grads, float("inf"))] if grads else []
        fin = torch.stack([lv] + peaks).isfinite()
        bad = ~fin.all()
        if step != self._step:  # a new step: its passes share one verdict
            self._step = step
            self.step_bad.zero_()
        new = bad & ~self.step_bad
        hit = new & (self.count == self.limit)  # the step that goes over the budget
        self.record[0].masked_fill_(hit, step)
        self.record[1].masked_fill_(hit, key)
        self.record[2].copy_(torch.where(hit, (~fin).to(torch.int64).argmax(), self.record[2]))
        self.record_loss.copy_(torch.where(hit, lv, self.record_loss))
        self.count += new
        self.step_bad |= bad
        skip = self.step_bad | (self.count > self.limit)
        for b, s in zip(buffers, saved):
            b.copy_(torch.where(skip, s, b))
        self.skip = skip
        self.passes += 1
        return skip

    def due(self) -> bool:
        """Whether the algorithm reads the flag now (every pass on the CPU)."""
        if self._dev is None:
            return False
        every = self.check_every
        if every is None:
            every = 1 if self._dev.type == "cpu" else DEFAULT_CHECK_EVERY
        return self.passes % every == 0

    def check(self) -> int:
        """Host read: the number of non-finite steps so far; raises :class:`NonFiniteError` when
        more than ``limit`` (every update from that step on was skipped)."""
        if self._dev is None:
            return 0
        n = int(self.count)
        if n > self.limit:
            step, key, idx = self.record.tolist()
            if idx <= 0:
                what = f"loss ({float(self.record_loss)})"
            else:
                per = 2 if self._dev.type == "cpu" else 1  # values per gradient in observe's reduction
                what = f"gradient of {self._names[key][(idx - 1) // per]!r} (the loss is finite)"
            self.reset()  # reported: a caller that goes on (e.g. at a lower rate) trains again
            raise NonFiniteError(step, what, n, self.limit)
        return n

    def reset(self) -> None:
        """Forget the non-finite steps seen so far: updates apply again from the next step."""
        if self._dev is not None:
            self._init(self._dev)
        self.skip = None
        self._step = None
