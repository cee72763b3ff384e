"""Decoding JPEG batches on the target device (``FolderLoader(decode="device")``), and the crop
geometry both decode paths share.

The worker processes only read each file's bytes (:class:`RawFiles`); the main process decodes a
whole batch with ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on a GPU, libjpeg on the
CPU) and applies the same geometry as the PIL path of :mod:`bip_fast.data.folder`: the crop box
and flip come from :func:`train_geometry` / :func:`eval_geometry`, which both paths call. The
resize re-implements PIL's ``Image.resize(..., BILINEAR, box=...)`` (the evaluation resize is the
same with the whole image as the box): the same filter coefficients (taps outside the box
included, rounded to PIL's fixed point), one pass per axis in PIL's order, each rounded to uint8
values, as exact float64 matmuls (tested equal to Pillow 13's bit for bit). On the CPU (libjpeg)
the training and evaluation batches measured equal to the PIL path's (up to float32 rounding of
the normalisation, 2.4e-7). A GPU's decoder (nvJPEG) may decode slightly differently from
libjpeg: not measured.

Robustness: files that are not JPEG (checked by their first two bytes) skip the device decoder;
if the batched call raises, each image is decoded alone; an image the device decoder refuses
(whatever ``decode_jpeg`` raises on: a truncated file, a mode it lacks) is decoded on the host by
``host_decode`` (PIL) and copied to the device (counted in ``DeviceDecoder.fallbacks``); one that
fails there too is dropped from the batch and counted as skipped, as in the PIL path.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["DECODE_MODES", "train_geometry", "eval_geometry", "to_chw", "RawFiles", "collate_raw",
           "DeviceDecoder"]

DECODE_MODES = ("cpu", "device")
_JPEG_START = (0xFF, 0xD8)


# --------------------------------------------------------------------------------------------
# Geometry shared with the PIL path
# --------------------------------------------------------------------------------------------
def _crop_box(w: int, h: int, gen: torch.Generator) -> Tuple[int, int, int, int]:
    """Random resized crop box (left, top, width, height); see :mod:`bip_fast.data.folder`."""
    area = w * h
    log_r = (math.log(3 / 4), math.log(4 / 3))
    draws = torch.rand(10, 3, generator=gen, dtype=torch.float64).tolist()
    for u_area, u_ratio, u_pos in draws:
        target = area * (0.08 + u_area * 0.92)
        ratio = math.exp(log_r[0] + u_ratio * (log_r[1] - log_r[0]))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            # one uniform draw places the box: its integer split gives left and top
            pos = int(u_pos * (w - cw + 1) * (h - ch + 1))
            return pos % (w - cw + 1), pos // (w - cw + 1), cw, ch
    r = w / h
    if r < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif r > 4 / 3:
        cw, ch = int(round(h * (4 / 3))), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def train_geometry(w: int, h: int, seed: int) -> Tuple[Tuple[int, int, int, int], bool]:
    """(crop box (left, top, width, height), flip?) of a training image, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    box = _crop_box(w, h, gen)
    return box, bool(torch.rand((), generator=gen) < 0.5)


def eval_geometry(w: int, h: int, eval_resize: int, size: int) -> Tuple[int, int, int, int]:
    """(resized width, resized height, left, top): torchvision's Resize(eval_resize) (shorter side)
    + CenterCrop(size) arithmetic, so results match it."""
    r = eval_resize
    rw, rh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    return rw, rh, int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))


def to_chw(img) -> torch.Tensor:
    """An RGB PIL image as a uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Worker side: bytes only
# --------------------------------------------------------------------------------------------
class RawFiles(torch.utils.data.Dataset):
    """``samples[i]``'s file as bytes; indexed by ``(i, seed)``, returns ``(uint8 [n] or None if
    unreadable, label, seed)``."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        i, seed = key
        path, label = self.samples[i]
        try:
            data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        except (OSError, ValueError):
            data = None
        return data, label, seed


def collate_raw(items):
    """(list of byte tensors or None, list of labels, list of seeds)."""
    return [d for d, _, _ in items], [y for _, y, _ in items], [s for _, _, s in items]


# --------------------------------------------------------------------------------------------
# Main-process side: decode + geometry on the device
# --------------------------------------------------------------------------------------------
_PIL_ONE = float(1 << 22)  # PIL's 8-bit resampling keeps its coefficients in 22-bit fixed point


def _pil_weights(in_size: int, start: int, extent: int, out_size: int, device) -> Tuple[torch.Tensor, int, int]:
    """(float64 [out_size, hi - lo] weights, lo, hi): PIL's BILINEAR resampling of the span
    ``[start, start + extent)`` of an axis of ``in_size`` pixels to ``out_size`` pixels, as a dense
    matrix over the source pixels ``[lo, hi)`` that some output reads. Each output pixel's triangle
    filter (widened by the downscale factor) is centred on its position in the span and cut to
    whole source pixels inside the image, not the span: near the span's edge PIL also reads the
    pixels just outside it. Normalised to sum 1, then rounded to PIL's fixed point."""
    scale = extent / out_size
    fscale = max(scale, 1.0)  # the filter widens when downscaling (antialiasing), never narrows
    lo = max(int(start + 0.5 * scale - fscale + 0.5), 0)  # the first output's first tap, as below
    hi = min(int(start + (out_size - 0.5) * scale + fscale + 0.5), in_size)
    f64 = dict(dtype=torch.float64, device=device)
    center = (torch.arange(out_size, **f64) + 0.5).mul_(scale).add_(start)[:, None]
    first = (center - fscale + 0.5).trunc_().clamp_(min=0)
    last = (center + fscale + 0.5).trunc_().clamp_(max=in_size)  # taps in [first, last)
    x = torch.arange(lo, hi, **f64)[None]
    w = (x - center + 0.5).mul_(1.0 / fscale).abs_().neg_().add_(1).clamp_(min=0)
    w.mul_((x >= first) & (x < last))
    w.div_(w.sum(1, keepdim=True))
    return w.mul_(_PIL_ONE).add_(0.5).floor_().div_(_PIL_ONE), lo, hi


def _pil_round(x: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a resampling sum to uint8 (half up, clipped), as whole float values."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def _pil_resize(img: torch.Tensor, box: Tuple[int, int, int, int], h: int, w: int,
                vertical_first: Optional[bool] = None) -> torch.Tensor:
    """``Image.resize((w, h), Image.BILINEAR, box=(left, top, left + bw, top + bh))`` of a uint8
    [C, H, W] image, ``box = (left, top, bw, bh)``, as float32 whole pixel values: one pass per
    axis, each rounded to uint8 values as PIL's are, in PIL's order (see :func:`_vertical_first`).
    The weights are multiples of 2**-22 and the pixels bytes, so float64 sums are exact: the result
    is PIL's bit for bit, whatever the matmul's summation order (and TF32 settings do not apply)."""
    left, top, bw, bh = box
    _, in_h, in_w = img.shape
    wy, y0, y1 = _pil_weights(in_h, top, bh, h, img.device)
    wx, x0, x1 = _pil_weights(in_w, left, bw, w, img.device)
    x = img[:, y0:y1, x0:x1].double()
    if _vertical_first(in_w, in_h, w, h) if vertical_first is None else vertical_first:
        return _pil_round(torch.matmul(_pil_round(torch.matmul(wy, x)), wx.t())).float()
    return _pil_round(torch.matmul(wy, _pil_round(torch.matmul(x, wx.t())))).float()


@functools.lru_cache(maxsize=None)
def _pil_may_resize_vertically_first() -> bool:
    """Whether the installed Pillow runs the vertical pass first in :func:`_vertical_first`'s case
    (Pillow 13 does; earlier versions always resample horizontally first): tried once on an image
    where the two orders round differently."""
    try:
        from PIL import Image
    except ImportError:
        return False
    img = torch.randint(0, 256, (1, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    want = torch.from_numpy(np.array(Image.fromarray(img[0].numpy(), "L").resize((60, 20), Image.BILINEAR)))
    return torch.equal(_pil_resize(img, (0, 0, 64, 64), 20, 60, vertical_first=True)[0], want.float())


def _vertical_first(in_w: int, in_h: int, w: int, h: int) -> bool:
    """Pillow 13's choice of pass order for a resize of an ``in_w`` x ``in_h`` image to ``w`` x
    ``h``, found by measuring it: vertical first when the height loses more than twice as many
    pixels as the width (which may gain some), where the installed Pillow makes that choice."""
    return h < in_h and 2 * (in_w - w) < in_h - h and _pil_may_resize_vertically_first()


class DeviceDecoder:
    """Turns ``collate_raw`` batches into ``(float32 [B, 3, size, size] in [0, 255] on device,
    int64 labels, skipped)``, or ``(None, None, skipped)`` when no image of the batch decodes;
    normalisation is left to the caller. ``host_decode(path)`` is the fallback decoder: an RGB PIL
    image or None."""

    def __init__(self, *, size: int, eval_resize: int, train: bool, device,
                 host_decode: Callable[[str], object]):
        try:
            import torchvision.io as tvio  # optional dependency, only for this path
        except ImportError as e:
            raise ImportError("decode='device' needs torchvision (torchvision.io.decode_jpeg)") from e
        self._tvio = tvio
        self.size, self.eval_resize, self.train = int(size), int(eval_resize), bool(train)
        self.device = torch.device(device)
        self.host_decode = host_decode
        self.fallbacks = 0  # images decoded on the host because the device decoder refused them

    def _decode_jpeg(self, data):
        return self._tvio.decode_jpeg(data, device=self.device, mode=self._tvio.ImageReadMode.RGB)

    def _one(self, data: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return self._decode_jpeg(data)
        except (RuntimeError, ValueError):
            return None

    def decode(self, datas: Sequence[Optional[torch.Tensor]], paths: Sequence[str]) -> List[Optional[torch.Tensor]]:
        """uint8 [3, H, W] images on the device (None where neither decoder could read the file)."""
        out: List[Optional[torch.Tensor]] = [None] * len(datas)
        jpeg = [k for k, d in enumerate(datas) if d is not None and d.numel() > 2 and tuple(d[:2].tolist()) == _JPEG_START]
        if jpeg:
            try:
                got = self._decode_jpeg([datas[k] for k in jpeg])
            except (RuntimeError, ValueError):
                got = [self._one(datas[k]) for k in jpeg]
            for k, x in zip(jpeg, got):
                out[k] = x
        for k, x in enumerate(out):
            if x is None:
                img = self.host_decode(paths[k])
                if img is not None:
                    self.fallbacks += 1
                    out[k] = to_chw(img).to(self.device)
        return out

    def transform(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        """The training crop + flip or the evaluation resize + centre crop of one uint8 image, as
        float32 [3, size, size] whole pixel values."""
        _, h, w = img.shape
        s = self.size
        if self.train:
            (left, top, cw, ch), flip = train_geometry(w, h, seed)
            x = _pil_resize(img, (left, top, cw, ch), s, s)
            return x.flip(-1) if flip else x
        rw, rh, left, top = eval_geometry(w, h, self.eval_resize, s)
        x = img.float() if (rw, rh) == (w, h) else _pil_resize(img, (0, 0, w, h), rh, rw)
        return x[:, top:top + s, left:left + s]

    def __call__(self, datas, labels, seeds, paths):
        imgs = self.decode(datas, paths)
        keep = [k for k, x in enumerate(imgs) if x is not None]
        skipped = len(imgs) - len(keep)
        if not keep:
            return None, None, skipped
        x = torch.stack([self.transform(imgs[k], seeds[k]) for k in keep])
        return x, torch.tensor([labels[k] for k in keep], dtype=torch.long), skipped
