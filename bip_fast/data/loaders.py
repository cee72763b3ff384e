"""Resumable batching on the device: augmentation, the epoch plan, and the two-shuffle BiP loader.

Determinism and exact resume
----------------------------
Every random decision of an epoch (the permutation, each sample's crop offset and flip bit) is drawn
up front from a CPU ``torch.Generator`` whose state at the start of the epoch is part of
``Loader.state_dict()``. The epoch-start state is derived from ``(seed, epoch)`` only, so the same
seed gives the same batches on every device, and restoring ``(epoch, position, generator state)``
reproduces the remaining batches of an interrupted epoch bit for bit.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["PAD", "Loader", "BilevelLoader", "augment_batch", "eval_loader"]

PAD = 4  # zero padding of the random crop, in pixels

def augment_batch(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                  pad: int = PAD) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a batch, in one gather.

    ``x``: ``[B, C, H, W]``; ``offsets``: int ``[B, 2]`` in ``[0, 2*pad]`` (row, column of the
    window's top-left corner in the padded image; ``(pad, pad)`` is no shift); ``flips``: bool or
    0/1 ``[B]``. The batch is zero-padded once and every sample's window (mirrored where flipped) is
    gathered with advanced indexing: no Python loop over samples, dtype preserved.
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if tuple(offsets.shape) != (B, 2) or tuple(flips.shape) != (B,):
        raise ValueError(f"offsets/flips: expected shapes ({B}, 2) and ({B},), got "
                         f"{tuple(offsets.shape)} and {tuple(flips.shape)}")
    dev = x.device
    offsets = offsets.to(dev, torch.long)
    flips = flips.to(dev).bool()
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(H, device=dev)
    ar_w = torch.arange(W, device=dev)
    rows = offsets[:, 0:1] + ar_h                                   # [B, H]
    cols = offsets[:, 1:2] + torch.where(flips[:, None], W - 1 - ar_w, ar_w)  # [B, W]
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    cidx = torch.arange(C, device=dev)[None, :, None, None]
    return padded[bidx, cidx, rows[:, None, :, None], cols[:, None, None, :]]


def _mix_seed(seed: int, epoch: int) -> int:
    """splitmix64 of (seed, epoch): independent-looking epoch seeds from one user seed."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) + 1) & 0xFFFFFFFFFFFFFFFF
    for _ in range(2):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


class Loader:
    """Batches over device-resident ``(x, y)``.

    ``x``: uint8 ``[N, C, H, W]`` images (any device), ``y``: int64 ``[N]`` labels on the same
    device. Yields ``(images, labels)``: images float32 normalised with ``mean``/``std`` (given in
    [0, 1] pixel units), optionally channels_last; all work happens on ``x.device``.

    ``train=True`` shuffles and augments (random crop with 4-pixel zero padding, horizontal flip)
    and by default drops the last partial batch; ``train=False`` keeps order, does not augment and
    keeps the last partial batch. ``shuffle``/``augment`` override those choices separately.

    Randomness comes from the loader's own CPU ``torch.Generator``; the generator state at the
    start of an epoch is a function of ``(seed, epoch)``. ``state_dict()`` records the epoch, the
    number of batches already yielded in it and that state, so a loader restored with
    ``load_state_dict()`` yields exactly the remaining batches. Iterating runs the rest of the
    current epoch and then advances to the next; breaking out of the loop keeps the position, so a
    new ``iter()`` continues where the last one stopped. Only one iterator may be active at a time.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool,
                 mean=None, std=None, seed: int = 0, drop_last: bool | None = None,
                 channels_last: bool = False, shuffle: bool | None = None,
                 augment: bool | None = None, dtype: torch.dtype = torch.float32):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x, y: expected tensors, got {type(x).__name__}, {type(y).__name__}")
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x: expected uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected shape ({x.shape[0]},) like x's first dim, got "
                             f"{tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y: expected device {x.device} like x, got {y.device}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        C = x.shape[1]
        mean = (0.0,) * C if mean is None else tuple(float(m) for m in mean)
        std = (1.0,) * C if std is None else tuple(float(s) for s in std)
        if len(mean) != C or len(std) != C:
            raise ValueError(f"mean/std: expected {C} values each (one per channel), got "
                             f"{len(mean)} and {len(std)}")
        if not all(s > 0 for s in std):
            raise ValueError(f"std: expected positive values, got {std}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.train = bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.augment = self.train if augment is None else bool(augment)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.seed = seed
        self.mean, self.std = mean, std
        # (x / 255 - mean) / std == x * scale + shift
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=x.device,
                                   dtype=torch.float32).view(1, C, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=x.device,
                                   dtype=torch.float32).view(1, C, 1, 1)
        if len(self) == 0:
            raise ValueError(f"batch_size: {batch_size} with drop_last={self.drop_last} over "
                             f"{x.shape[0]} samples gives no batch")
        self._token = 0
        self._plan_cache = None
        self.set_epoch(0)

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already yielded in the current epoch."""
        return self._pos

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (its shuffle and augmentation depend only on it)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        self._epoch = epoch
        self._pos = 0
        self._epoch_state = torch.Generator().manual_seed(_mix_seed(self.seed, epoch)).get_state()
        self._token += 1  # invalidates a running iterator

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._pos,
            "generator": self._epoch_state.clone(),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from Loader.state_dict(), got "
                            f"{type(state).__name__}")
        for k in ("epoch", "position", "generator"):
            if k not in state:
                raise ValueError(f"state: missing key {k!r} (expected a Loader.state_dict())")
        for k, mine in (("num_samples", self.num_samples), ("batch_size", self.batch_size)):
            if k in state and state[k] != mine:
                raise ValueError(f"state: {k} is {state[k]} but this loader has {mine}")
        pos = int(state["position"])
        if not 0 <= pos <= len(self):
            raise ValueError(f"state: position must be in [0, {len(self)}], got {pos}")
        gen = state["generator"]
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError("state: 'generator' must be a uint8 tensor from Generator.get_state()")
        if "seed" in state:  # later epochs derive their generator state from (seed, epoch)
            self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._pos = pos
        self._epoch_state = gen.detach().cpu().clone()
        self._token += 1
        self._plan_cache = None

    # -- iteration ----------------------------------------------------------------------------
    def _plan(self) -> torch.Tensor | None:
        """This epoch's per-position random draws on the device: int64 [N, 4] = (sample index,
        crop row, crop column, flip), or None when neither shuffling nor augmenting."""
        if not (self.shuffle or self.augment):
            return None
        cache = self._plan_cache
        if cache is not None and cache[0] == self._epoch and torch.equal(cache[1],
                                                                         self._epoch_state):
            return cache[2]
        n = self.num_samples
        g = torch.Generator()
        g.set_state(self._epoch_state)
        plan = torch.empty(n, 4, dtype=torch.long)
        plan[:, 0] = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.augment:
            plan[:, 1:3] = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
            plan[:, 3] = torch.randint(0, 2, (n,), generator=g)
        plan = plan.to(self.x.device)
        self._plan_cache = (self._epoch, self._epoch_state.clone(), plan)
        return plan

    def _batch(self, plan: torch.Tensor | None, b: int):
        lo = b * self.batch_size
        hi = min(lo + self.batch_size, self.num_samples)
        if plan is None:
            xb, yb = self.x[lo:hi], self.y[lo:hi]
        else:
            p = plan[lo:hi]
            idx = p[:, 0]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = augment_batch(xb, p[:, 1:3], p[:, 3])
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out = torch.addcmul(self._shift, xb.float(), self._scale)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out.to(self.dtype), yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._token += 1
        return self._run(self._token)

    def _run(self, token: int):
        plan = self._plan()
        nb = len(self)
        while self._pos < nb:
            if token != self._token:
                raise RuntimeError("Loader: this iterator was superseded by a newer iter(), "
                                   "set_epoch() or load_state_dict(); use one iterator at a time")
            b = self._pos
            batch = self._batch(plan, b)
            self._pos = b + 1
            yield batch
        if token == self._token:
            self.set_epoch(self._epoch + 1)


def eval_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean=None, std=None,
                channels_last: bool = False, **kwargs) -> Loader:
    """In-order evaluation loader: no shuffle, no augmentation, last partial batch kept."""
    return Loader(x, y, batch_size, train=False, mean=mean, std=std, channels_last=channels_last,
                  **kwargs)


class BilevelLoader:
    """Pairs two loaders for bi-level training: yields ``(lower_batch, upper_batch)``.

    An epoch is one pass of ``upper``; ``lower`` keeps its own independent shuffle and starts a
    new epoch of its own whenever it runs out. ``state_dict()`` holds both loaders' states.
    """

    def __init__(self, lower: Loader, upper: Loader):
        for label, ld in (("lower", lower), ("upper", upper)):
            if not isinstance(ld, Loader):
                raise TypeError(f"{label}: expected a Loader, got {type(ld).__name__}")
        if lower is upper:
            raise ValueError("lower, upper: expected two distinct Loader objects (independent "
                             "shuffles), got the same object twice")
        self.lower, self.upper = lower, upper

    def __len__(self) -> int:
        return len(self.upper)

    @property
    def epoch(self) -> int:
        return self.upper.epoch

    def set_epoch(self, epoch: int) -> None:
        """Jump the upper loader to ``epoch``; the lower loader keeps its own position."""
        self.upper.set_epoch(epoch)

    def __iter__(self):
        lower_it = iter(self.lower)
        for upper_batch in self.upper:
            try:
                lower_batch = next(lower_it)
            except StopIteration:
                lower_it = iter(self.lower)
                lower_batch = next(lower_it)
            yield lower_batch, upper_batch

    def state_dict(self) -> dict:
        return {"lower": self.lower.state_dict(), "upper": self.upper.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "lower" not in state or "upper" not in state:
            raise ValueError("state: expected a dict with keys 'lower' and 'upper' from "
                             "BilevelLoader.state_dict()")
        self.lower.load_state_dict(state["lower"])
        self.upper.load_state_dict(state["upper"])
