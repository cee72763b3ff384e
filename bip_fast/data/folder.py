"""Tiny-ImageNet and ImageNet from JPEG folders: scanning, decoding workers, resumable batching.

Layouts (nothing is downloaded; ``root`` must hold the extracted archive):

- ``imagenet``: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (the validation
  images sorted into class folders, as torchvision's ImageFolder expects). Classes are the train
  class folders, sorted.
- ``tiny-imagenet``: ``root/train/<wnid>/images/*.JPEG``, ``root/val/images/*.JPEG`` and
  ``root/val/val_annotations.txt`` (tab-separated: file name, wnid, then the box). Classes are
  the lines of ``root/wnids.txt`` when present, else the sorted train class folders.

Bad input is a clear error before any training: a missing split folder or annotation file
(FileNotFoundError naming the path), a train class folder without images, an annotation line
naming an unknown class or a missing file (ValueError naming folder / line). A file that fails
to decode (a corrupt or truncated JPEG) is skipped and counted (``FolderLoader.skipped``); it
never stops an epoch. Grayscale, CMYK and palette images are converted to RGB.

Augmentation (per image, in the decoding workers): training uses the random resized crop
(area fraction in [0.08, 1], aspect ratio in [3/4, 4/3] log-uniform, ten tries then the central
crop of the nearest allowed aspect ratio) to ``size`` x ``size`` plus a horizontal flip with
probability 1/2; evaluation resizes the shorter side to ``eval_resize`` and takes the central
``size`` x ``size`` crop. Batches leave the workers as uint8 (pinned when the target is a GPU)
and are normalised on the target device. ``FolderLoader(decode="device")`` instead decodes the
JPEGs and applies the same crops and flips on the target device (see
:mod:`bip_fast.data.device_decode`).

Determinism and exact resume: every random decision of an epoch (the permutation and one 62-bit
seed per position, from which that image's crop and flip are drawn) comes from a CPU generator
seeded by ``(seed, epoch)``, as in :mod:`bip_fast.data.loaders`. So the batches do not depend on
the number of workers, and ``state_dict()`` = (epoch, position) restores the rest of an epoch
exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .device_decode import DECODE_MODES, DeviceDecoder, RawFiles, collate_raw, eval_geometry, to_chw, train_geometry
from .loaders import Loader

__all__ = ["FOLDER_DATASETS", "SPECS", "scan", "FolderImages", "FolderLoader",
           "FolderData", "load_folder_dataset", "decode_rgb"]

FOLDER_DATASETS = ("tiny-imagenet", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# size: training / evaluation crop; eval_resize: shorter side before the evaluation crop.
SPECS = {
    "tiny-imagenet": dict(size=64, eval_resize=64, mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821)),
    "imagenet": dict(size=224, eval_resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
EXTENSIONS = (".jpeg", ".jpg", ".png")
Sample = Tuple[str, int]


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder '{path}' does not exist")
    return path


def _class_folders(train: Path) -> List[str]:
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data_dir: '{train}' holds no class folders")
    return classes


def _scan_tiny(root: Path, split: str) -> Tuple[List[Sample], List[str]]:
    train = _need_dir(root / "train", "data_dir")
    wnids = root / "wnids.txt"
    if wnids.is_file():
        classes = [ln.strip() for ln in wnids.read_text().splitlines() if ln.strip()]
    else:
        classes = _class_folders(train)
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        out: List[Sample] = []
        for c in classes:
            folder = _need_dir(train / c, "data_dir")
            if (folder / "images").is_dir():
                folder = folder / "images"
            files = _images_in(folder)
            if not files:
                raise ValueError(f"data_dir: class folder '{folder}' holds no images")
            out += [(f, index[c]) for f in files]
        return out, classes
    val = _need_dir(root / "val", "data_dir")
    ann = val / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"data_dir: annotation file '{ann}' does not exist")
    out = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"data_dir: '{ann}' line {n}: expected 'file<TAB>wnid...', got {line!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise ValueError(f"data_dir: '{ann}' line {n}: class {wnid!r} is not among the {len(classes)} classes")
        path = val / "images" / name
        if not path.is_file():
            raise ValueError(f"data_dir: '{ann}' line {n}: image '{path}' does not exist")
        out.append((str(path), index[wnid]))
    if not out:
        raise ValueError(f"data_dir: '{ann}' lists no images")
    return out, classes


def _scan_imagenet(root: Path, split: str) -> Tuple[List[Sample], List[str]]:
    classes = _class_folders(_need_dir(root / "train", "data_dir"))
    folder = _need_dir(root / split, "data_dir")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in index)
    if extra:
        raise ValueError(f"data_dir: '{folder}' has class folders not in train/: {extra[:5]}")
    out: List[Sample] = []
    for c in classes:
        sub = folder / c
        files = _images_in(sub) if sub.is_dir() else []
        if not files and split == "train":
            raise ValueError(f"data_dir: class folder '{sub}' holds no images")
        out += [(f, index[c]) for f in files]
    if not out:
        raise ValueError(f"data_dir: '{folder}' holds no images")
    return out, classes


def scan(name: str, root, split: str) -> Tuple[List[Sample], List[str]]:
    """(samples, classes): ``[(path, label)]`` of ``split`` ("train" or "val") and the class
    names, for ``name`` in :data:`FOLDER_DATASETS` (see the module docstring for the layouts)."""
    if name not in FOLDER_DATASETS:
        raise ValueError(f"dataset: expected one of {FOLDER_DATASETS}, got {name!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    root = _need_dir(Path(root), "data_dir")
    return (_scan_tiny if name == "tiny-imagenet" else _scan_imagenet)(root, split)


# --------------------------------------------------------------------------------------------
# Decoding + augmentation (runs in the worker processes)
# --------------------------------------------------------------------------------------------
def decode_rgb(path: str):
    """The image as an RGB PIL image, or None if it cannot be decoded (corrupt, truncated)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # forces the full decode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class FolderImages(torch.utils.data.Dataset):
    """``samples[i]`` decoded and augmented; indexed by ``(i, seed)`` (the seed drives the
    training crop and flip). Returns ``(uint8 [3, size, size] or None, label)``, or with
    ``normalize=(scale, shift)`` (per-channel ``[3, 1, 1]`` tensors) the normalised float32 image:
    for a CPU target the workers normalise each image while it is in cache; for a GPU the batch
    stays uint8 (a quarter of the bytes to copy) and is normalised on the device."""

    def __init__(self, samples: Sequence[Sample], *, size: int, eval_resize: int, train: bool,
                 normalize: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        self.samples = list(samples)
        self.size, self.eval_resize, self.train = int(size), int(eval_resize), bool(train)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.samples)

    def _transform(self, img, seed: int):
        from PIL import Image

        s = self.size
        if self.train:
            (left, top, cw, ch), flip = train_geometry(img.width, img.height, seed)
            img = img.resize((s, s), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img
        w, h, left, top = eval_geometry(img.width, img.height, self.eval_resize, s)
        if (w, h) != (img.width, img.height):
            img = img.resize((w, h), Image.BILINEAR)
        return img.crop((left, top, left + s, top + s))

    def __getitem__(self, key):
        i, seed = key
        path, label = self.samples[i]
        img = decode_rgb(path)
        if img is None:
            return None, label
        x = to_chw(self._transform(img, seed))
        if self.normalize is None:
            return x, label
        scale, shift = self.normalize
        out = torch.empty(x.shape, dtype=torch.float32)  # contiguous CHW, written in one pass
        return torch.mul(x, scale, out=out).add_(shift), label


def _collate(items):
    kept = [(x, y) for x, y in items if x is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return None, None, skipped
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept], dtype=torch.long), skipped


# --------------------------------------------------------------------------------------------
# Resumable loader
# --------------------------------------------------------------------------------------------
class FolderLoader(Loader):
    """Batches over a folder dataset, with the bookkeeping of :class:`bip_fast.data.Loader`
    (inherited: ``len``, ``epoch``, ``position``, ``set_epoch``, ``state_dict``/``load_state_dict``
    with the epoch generator state; one iterator at a time; breaking out keeps the position), so
    :class:`bip_fast.data.BilevelLoader` pairs two of them as it pairs CIFAR loaders.

    ``train=True`` shuffles, augments and drops the last partial batch; ``train=False`` keeps
    order and the last batch. ``num_workers`` decoding processes (0: in this process) feed a
    ``torch.utils.data.DataLoader``; batches are pinned when ``device`` is a GPU, moved with
    ``non_blocking`` and normalised there (float32, optionally channels_last); for a CPU target
    the workers normalise each image (see :class:`FolderImages`). Undecodable
    images are dropped from their batch and counted in ``skipped`` (kept in the state; a batch
    of only such images is not yielded).

    ``decode="cpu"`` (the default) decodes and augments with PIL in the workers, as above.
    ``decode="device"`` has the workers read only the files' bytes and decodes each batch in this
    process with ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on a GPU, libjpeg on the
    CPU), then crops, resizes (PIL's bilinear resize re-implemented), flips and normalises there
    (:mod:`bip_fast.data.device_decode`): the same crop boxes, flips, batches and resume as the
    CPU path; on the CPU device, training and evaluation batches measured equal to it. Files the device decoder refuses (PNG, or anything ``decode_jpeg``
    raises on) are decoded with PIL on the host (counted in ``decoder.fallbacks``); files PIL
    refuses too are skipped as above. The device path is tested on the CPU only and has not been
    measured on a GPU yet; "cpu" stays the default until a measurement shows the device path
    faster.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, *, train: bool, size: int, eval_resize: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0, num_workers: int = 0, device="cpu",
                 channels_last: bool = False, drop_last: Optional[bool] = None, decode: str = "cpu"):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers: expected a non-negative int, got {num_workers!r}")
        if not isinstance(decode, str) or decode not in DECODE_MODES:
            raise ValueError(f"decode: expected one of {DECODE_MODES}, got {decode!r}")
        if not samples:
            raise ValueError("samples: expected at least one (path, label) pair, got none")
        if not (isinstance(size, int) and isinstance(eval_resize, int) and 0 < size <= eval_resize):
            raise ValueError(f"size/eval_resize: expected integers with 0 < size <= eval_resize, got {size}/{eval_resize}")
        self.images = FolderImages(samples, size=size, eval_resize=eval_resize, train=train)
        self.batch_size, self.train, self.seed = batch_size, bool(train), int(seed)
        self.shuffle = self.augment = self.train
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.dtype = torch.float32
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device).view(1, 3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=self.device).view(1, 3, 1, 1)
        self.decode = decode
        self.decoder = None
        if decode == "device":
            self.decoder = DeviceDecoder(size=size, eval_resize=eval_resize, train=train, device=self.device,
                                         host_decode=decode_rgb)
        elif self.device.type == "cpu":  # normalise in the workers (see FolderImages)
            self.images.normalize = (self._scale.view(3, 1, 1), self._shift.view(3, 1, 1))
        if len(self) == 0:
            raise ValueError(f"batch_size: {batch_size} with drop_last={self.drop_last} over {len(samples)} "
                             f"images gives no batch")
        self.skipped = 0
        self._token = 0
        self._plan_cache = None
        self.set_epoch(0)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.skipped = int(state.get("skipped", 0))

    def _batches(self) -> List[List[Tuple[int, int]]]:
        """This epoch's batches of (sample index, augmentation seed)."""
        n = self.num_samples
        g = torch.Generator()
        g.set_state(self._epoch_state)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        seeds = torch.randint(0, 2 ** 62, (n,), generator=g)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        return [pairs[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def _run(self, token: int):
        on_host = self.images.normalize is not None
        plan = self._batches()[self._pos:]
        raw = self.decoder is not None
        dl = torch.utils.data.DataLoader(
            RawFiles(self.images.samples) if raw else self.images, batch_sampler=plan, num_workers=self.num_workers,
            collate_fn=collate_raw if raw else _collate, pin_memory=self.device.type == "cuda" and not raw,
            prefetch_factor=4 if self.num_workers else None)
        for k, out in enumerate(dl):
            if token != self._token:
                raise RuntimeError("FolderLoader: this iterator was superseded by a newer iter(), set_epoch() or "
                                   "load_state_dict(); use one iterator at a time")
            if raw:  # decode on the device; the paths come from this batch's plan
                out = self.decoder(*out, [self.images.samples[i][0] for i, _ in plan[k]])
            x, y, skipped = out
            self._pos += 1
            self.skipped += skipped
            if x is None:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if not on_host:
                x = torch.addcmul(self._shift, x.float(), self._scale)
            yield x, y.to(self.device, non_blocking=True)
        if token == self._token:
            self.set_epoch(self._epoch + 1)


# --------------------------------------------------------------------------------------------
# Dataset description
# --------------------------------------------------------------------------------------------
@dataclass
class FolderData:
    """A scanned folder dataset: samples of both splits, classes and the preprocessing spec."""

    name: str
    root: str
    train_samples: List[Sample]
    test_samples: List[Sample]
    classes: List[str]
    size: int
    eval_resize: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_loader(self, batch_size: int, *, seed: int = 0, **kwargs) -> FolderLoader:
        return FolderLoader(self.train_samples, batch_size, train=True, size=self.size, eval_resize=self.eval_resize,
                            mean=self.mean, std=self.std, seed=seed, **kwargs)

    def test_loader(self, batch_size: int, **kwargs) -> FolderLoader:
        return FolderLoader(self.test_samples, batch_size, train=False, size=self.size, eval_resize=self.eval_resize,
                            mean=self.mean, std=self.std, **kwargs)


def load_folder_dataset(name: str, data_dir=None) -> FolderData:
    """Scan ``name`` ("tiny-imagenet" or "imagenet") under ``data_dir`` (default:
    ``$BIP_FAST_DATA/<name>`` or ``./data/<name>``); see the module docstring."""
    if data_dir is None:
        data_dir = Path(os.environ.get("BIP_FAST_DATA", "data")) / name
    train, classes = scan(name, data_dir, "train")
    test, _ = scan(name, data_dir, "val")
    spec = SPECS[name]
    return FolderData(name, str(data_dir), train, test, classes, spec["size"], spec["eval_resize"],
                      tuple(spec["mean"]), tuple(spec["std"]))
