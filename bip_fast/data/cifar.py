"""Device-resident CIFAR data: loading, verification and class-balanced subsets.

The whole dataset is decoded from the python-pickle batches once, packed into one uint8 buffer and
copied to the target device in a single host->device transfer. Batching, augmentation (random crop
with 4-pixel zero padding, horizontal flip) and normalisation then run on that device, so a training
step never waits on the host.

Batching and its exact resume live in :mod:`bip_fast.data.loaders`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .loaders import Loader, eval_loader

__all__ = ["DATASETS", "Dataset", "load_dataset", "resolve_data_dir", "subset_indices"]

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
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None

    def train_loader(self, batch_size: int, *, seed: int = 0, **kwargs) -> "Loader":
        """Shuffling, augmenting loader over the training split."""
        return Loader(self.train_x, self.train_y, batch_size, train=True, mean=self.mean,
                      std=self.std, seed=seed, **kwargs)

    def test_loader(self, batch_size: int, **kwargs) -> "Loader":
        """In-order, non-augmenting loader over the test split (last partial batch kept)."""
        return eval_loader(self.test_x, self.test_y, batch_size, mean=self.mean, std=self.std,
                           **kwargs)

    def val_loader(self, batch_size: int, **kwargs) -> "Loader":
        """In-order, non-augmenting loader over the validation split (``load_dataset(val=N)``)."""
        if self.val_x is None:
            raise ValueError("val_loader: this dataset has no validation split; load it with "
                             "load_dataset(..., val=N)")
        return eval_loader(self.val_x, self.val_y, batch_size, mean=self.mean, std=self.std,
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


def _published_md5(name: str, file: str):
    """The published MD5 of ``file`` of CIFAR ``name`` from torchvision's dataset tables (None
    without torchvision or for another file name). torchvision is imported only when asked, as
    its import costs seconds."""
    try:
        from torchvision.datasets import CIFAR10, CIFAR100
    except ImportError:
        return None
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    return dict(list(cls.train_list) + list(cls.test_list)).get(file)


def _manifest_digests(folder: Path) -> dict:
    """File name -> (algorithm, hex digest, source) the batches must match, since a flipped byte
    inside the pixels unpickles fine: a SHA256SUMS / MD5SUMS manifest in the batches folder or the
    folder above it (paths relative to that folder). Files it does not list that are in the
    original distribution's format are held to the published MD5s instead (:func:`_read_batch`)."""
    out = {}
    for where in (folder.parent, folder):
        for manifest, algo in (("MD5SUMS", "md5"), ("SHA256SUMS", "sha256")):
            path = where / manifest
            if not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and (where / parts[1].lstrip("*")).parent == folder:
                    out[Path(parts[1]).name] = (algo, parts[0].lower(), f"'{path}'")
    return out


def _read_batch(path: Path, label_key: str, num_classes: int, digest=None,
                published: Callable[[], Optional[str]] = lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickle batch -> (uint8 [n, 3072], int64 [n]); ValueError naming the file.

    ``digest`` (algorithm, hex, source): the checksum the file must have; without one, a file in
    the original format (with 'filenames') must have the MD5 ``published()`` returns, if any."""
    try:
        raw = path.read_bytes()
        entry = pickle.loads(raw, encoding="latin1")
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
    if digest is None and "filenames" in entry:
        md5 = published()
        digest = None if md5 is None else ("md5", md5, "the published file")
    if digest is not None:
        algo, want, source = digest
        if hashlib.new(algo, raw).hexdigest() != want:
            raise ValueError(f"CIFAR file '{path}' is corrupt: its {algo.upper()} differs from the one of "
                             f"{source}; replace it with a fresh copy")
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
                 *, download: bool = True, val: int = 0) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 onto ``device``.

    ``subset=(n_train, n_test)`` keeps a class-balanced deterministic subset (``seed`` picks it;
    ``None`` for either means the whole split). ``val=N`` holds out a class-balanced validation
    split of N training images (``val_x``/``val_y``, :meth:`Dataset.val_loader`), disjoint from
    the training images: with a training subset it is drawn from the images the subset left
    out (the subset itself is the one ``val=0`` gives), without one the training split is the
    rest of the training images. The test split is never touched. Missing files are downloaded through torchvision
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
    digests = _manifest_digests(folder)
    for split, split_files in (("train", train_files), ("test", test_files)):
        batches = [_read_batch(folder / f, label_key, num_classes, digests.get(f), lambda f=f: _published_md5(key, f))
                   for f in split_files]
        parts[split] = (np.concatenate([b[0] for b in batches]),
                        np.concatenate([b[1] for b in batches]))

    if not isinstance(val, int) or isinstance(val, bool):
        raise TypeError(f"val: expected an int, got {type(val).__name__}")
    n_all = len(parts["train"][1])
    n_train, n_test = _parse_subset(subset, n_all, len(parts["test"][1]))
    if not 0 <= val <= n_all - (n_train if n_train < n_all else 0):
        raise ValueError(f"val: expected 0 <= val <= {n_all - (n_train if n_train < n_all else 0)} (training "
                         f"images outside the training subset), got {val}")
    if val:
        parts["train"], parts["val"] = _split_val(*parts["train"], n_train, val, num_classes, seed)
    else:
        x, y = parts["train"]
        if n_train != len(y):
            idx = subset_indices(torch.from_numpy(y), n_train, num_classes, seed).numpy()
            parts["train"] = (x[idx], y[idx])
    x, y = parts["test"]
    if n_test != len(y):
        idx = subset_indices(torch.from_numpy(y), n_test, num_classes, seed).numpy()
        parts["test"] = (x[idx], y[idx])

    # Pack images and labels (all < 256) into one uint8 buffer: a single host->device copy.
    names = [k for k in ("train", "test", "val") if k in parts]
    host = np.concatenate([parts[k][0].reshape(-1) for k in names] + [parts[k][1].astype(np.uint8) for k in names])
    buf = torch.from_numpy(host).to(device)
    out, at = {}, 0
    for k in names:
        n = parts[k][0].size
        out[k + "_x"] = buf[at:at + n].view(-1, 3, 32, 32)
        at += n
    for k in names:
        n = len(parts[k][1])
        out[k + "_y"] = buf[at:at + n].long()
        at += n
    return Dataset(**out, num_classes=num_classes, mean=mean, std=std, name=key)


def _split_val(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int, num_classes: int, seed: int):
    """(train, val) parts: the training subset ``n_train`` (as without a validation split, or all
    images but the validation ones when ``n_train`` is the whole split) and a class-balanced
    validation subset of ``n_val`` drawn (generator seeded with ``seed + 1``) from the rest."""
    labels = torch.from_numpy(y)
    everything = n_train == len(y)
    train = None if everything else subset_indices(labels, n_train, num_classes, seed).numpy()
    rest = np.arange(len(y)) if everything else np.setdiff1d(np.arange(len(y)), train)
    pick = rest[subset_indices(labels[torch.from_numpy(rest)], n_val, num_classes, seed + 1).numpy()]
    if everything:
        train = np.setdiff1d(np.arange(len(y)), pick)
    return (x[train], y[train]), (x[pick], y[pick])


