"""Device-resident CIFAR data: loading, class-balanced subsets and resumable batching.

The whole dataset is decoded from the python-pickle batches once, packed into one uint8 buffer and
copied to the target device in a single host->device transfer. Batching, augmentation (random crop
with 4-pixel zero padding, horizontal flip) and normalisation then run on that device, so a training
step never waits on the host.

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
import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "Dataset",
    "Loader",
    "BilevelLoader",
    "load_dataset",
    "resolve_data_dir",
    "subset_indices",
    "augment_batch",
    "eval_loader",
]

PAD = 4  # zero padding of the random crop, in pixels

# name -> (batches folder, train files, test files, label key, classes, mean, std)
# mean/std: per-channel statistics of the full training set in [0, 1] (population std).
_SPECS = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
        (0.49139968, 0.48215841, 0.44653091),
        (0.24703223, 0.24348513, 0.26158784),
    ),
    "cifar100": (
        "cifar-100-python",
        ("train",),
        ("test",),
        "fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}
DATASETS = tuple(_SPECS)


@dataclass
class Dataset:
    """A dataset held as tensors on one device.

    ``train_x``/``test_x``: uint8 ``[N, 3, 32, 32]``; ``train_y``/``test_y``: int64 ``[N]``;
    ``mean``/``std``: per-channel normalisation constants (in [0, 1] pixel units).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = ""

    def train_loader(self, batch_size: int, *, seed: int = 0, **kwargs) -> "Loader":
        """Shuffling, augmenting loader over the training split."""
        return Loader(self.train_x, self.train_y, batch_size, train=True, mean=self.mean,
                      std=self.std, seed=seed, **kwargs)

    def test_loader(self, batch_size: int, **kwargs) -> "Loader":
        """In-order, non-augmenting loader over the test split (last partial batch kept)."""
        return eval_loader(self.test_x, self.test_y, batch_size, mean=self.mean, std=self.std,
                           **kwargs)


# --------------------------------------------------------------------------------------------
# Locating and reading the pickles
# --------------------------------------------------------------------------------------------

def _check_name(name) -> tuple:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, one of {DATASETS}, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _SPECS:
        raise ValueError(f"name: expected one of {DATASETS}, got {name!r}")
    return key, _SPECS[key]


def _expected_files(spec) -> tuple[str, ...]:
    return tuple(spec[1]) + tuple(spec[2])


def _has_files(folder: Path, files) -> bool:
    return all((folder / f).is_file() for f in files)


def resolve_data_dir(name: str = "cifar10", data_dir=None) -> tuple[Path, Path]:
    """Return ``(root, batches_folder)`` for dataset ``name``.

    ``data_dir`` is the argument, else the environment variable ``BIP_FAST_DATA``, else ``./data``.
    It may be the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` or that folder
    itself. ``batches_folder`` is where the pickles are (or will be after a download into ``root``);
    nothing is checked beyond choosing between the two layouts.
    """
    _, spec = _check_name(name)
    if data_dir is None:
        data_dir = os.environ.get("BIP_FAST_DATA") or "./data"
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir: expected a str or os.PathLike, got {type(data_dir).__name__}")
    given = Path(data_dir).expanduser()
    base, files = spec[0], _expected_files(spec)
    if _has_files(given / base, files):
        return given, given / base
    if given.name == base or _has_files(given, files):
        return given.parent, given
    return given, given / base


def _download(name: str, root: Path) -> None:
    """Download and extract the official archive into ``root`` through torchvision."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(30.0)  # an offline machine must fail, not hang
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except BaseException:
        if created:  # a failed download leaves no empty data folder behind
            shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        socket.setdefaulttimeout(old)


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickle batch -> (uint8 [n, 3072], int64 [n]); ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR file '{path}' is missing") from None
    except Exception as e:  # truncated / garbage bytes raise many different exception types
        raise ValueError(f"CIFAR file '{path}' is corrupt or unreadable: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"CIFAR file '{path}' is corrupt: expected a dict with keys 'data' and "
                         f"{label_key!r}, got {keys}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR file '{path}' is corrupt: expected 'data' uint8 of shape (n, 3072), "
                         f"got {data.dtype} {tuple(data.shape)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"CIFAR file '{path}' is corrupt: expected {data.shape[0]} labels, "
                         f"got shape {tuple(labels.shape)}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer)
                        or labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"CIFAR file '{path}' is corrupt: labels must be integers in "
                         f"[0, {num_classes}), got {labels.dtype} in "
                         f"[{labels.min()}, {labels.max()}]")
    return data, labels.astype(np.int64)


def subset_indices(labels: torch.Tensor, n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Deterministic class-balanced subset: sorted int64 indices (on ``labels.device``) of ``n``
    samples, ``n // num_classes`` per class and one more for the first ``n % num_classes`` classes,
    each class's samples picked by a CPU generator seeded with ``seed``."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if not 0 <= n <= labels.numel():
        raise ValueError(f"n: expected 0 <= n <= {labels.numel()} (dataset size), got {n}")
    y = labels.detach().cpu().long()
    gen = torch.Generator().manual_seed(int(seed))
    base, extra = divmod(n, num_classes)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        want = base + (1 if c < extra else 0)
        if want > idx.numel():
            raise ValueError(f"n: a class-balanced subset of {n} needs {want} samples of class {c}, "
                             f"only {idx.numel()} available")
        perm = torch.randperm(idx.numel(), generator=gen)
        picks.append(idx[perm[:want]])
    out = torch.sort(torch.cat(picks)).values if picks else torch.zeros(0, dtype=torch.long)
    return out.to(labels.device)


def _parse_subset(subset, n_train: int, n_test: int) -> tuple[int, int]:
    if subset is None:
        return n_train, n_test
    if not isinstance(subset, (tuple, list)) or len(subset) != 2:
        raise TypeError(f"subset: expected None or a pair (n_train, n_test), got {subset!r}")
    out = []
    for label, value, limit in (("n_train", subset[0], n_train), ("n_test", subset[1], n_test)):
        if value is None:
            value = limit
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"subset: {label} must be an int or None, got {type(value).__name__}")
        if not 0 <= value <= limit:
            raise ValueError(f"subset: {label} must be in [0, {limit}], got {value}")
        out.append(value)
    return out[0], out[1]


def load_dataset(name: str = "cifar10", data_dir=None, device="cpu", subset=None, seed: int = 0,
                 *, download: bool = True) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 onto ``device``.

    ``subset=(n_train, n_test)`` keeps a class-balanced deterministic subset (``seed`` picks it;
    ``None`` for either means the whole split). Missing files are downloaded through torchvision
    when ``download`` is true and the network works; otherwise FileNotFoundError says which files
    are expected where. A corrupt pickle raises ValueError naming the file.
    """
    key, spec = _check_name(name)
    base, train_files, test_files, label_key, num_classes, mean, std = spec
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r} ({e})") from None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    root, folder = resolve_data_dir(key, data_dir)
    files = _expected_files(spec)
    if not _has_files(folder, files):
        reason = "download disabled"
        if download:
            try:
                _download(key, root)
                folder = root / base
                reason = ""
            except Exception as e:  # offline, proxy, disk full, bad archive ...
                reason = f"download failed: {type(e).__name__}: {e}"
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{key}: missing {', '.join(missing)} in '{folder}' ({reason}). Expected the "
                f"python-pickle files {', '.join(files)} in '{folder}' (i.e. '{root}/{base}/'). "
                f"Put them there, or point --data-dir / the BIP_FAST_DATA environment variable at "
                f"the folder holding '{base}'.")

    parts = {}
    for split, split_files in (("train", train_files), ("test", test_files)):
        batches = [_read_batch(folder / f, label_key, num_classes) for f in split_files]
        parts[split] = (np.concatenate([b[0] for b in batches]),
                        np.concatenate([b[1] for b in batches]))

    n_train, n_test = _parse_subset(subset, len(parts["train"][1]), len(parts["test"][1]))
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = parts[split]
        if n != len(y):
            idx = subset_indices(torch.from_numpy(y), n, num_classes, seed).numpy()
            parts[split] = (x[idx], y[idx])

    # Pack images and labels (all < 256) into one uint8 buffer: a single host->device copy.
    tx, ty = parts["train"]
    vx, vy = parts["test"]
    host = np.concatenate([tx.reshape(-1), vx.reshape(-1),
                           ty.astype(np.uint8), vy.astype(np.uint8)])
    buf = torch.from_numpy(host).to(device)
    a, b = tx.size, tx.size + vx.size
    c = b + len(ty)
    return Dataset(
        train_x=buf[:a].view(-1, 3, 32, 32),
        train_y=buf[b:c].long(),
        test_x=buf[a:b].view(-1, 3, 32, 32),
        test_y=buf[c:].long(),
        num_classes=num_classes,
        mean=mean,
        std=std,
        name=key,
    )


# --------------------------------------------------------------------------------------------
# Augmentation and batching
# --------------------------------------------------------------------------------------------

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
