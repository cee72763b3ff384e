"""FolderLoader(decode="device") on the CPU device against the PIL path (decode="cpu"): the same
batches, labels, crops and flips, pixel values equal up to interpolation rounding; grayscale,
CMYK and PNG files; the host fallback; corrupt files; bad values; exact resume; the training
resize against PIL's ``Image.resize`` with a box.

Measured on these trees (normalised units; one pixel level is 1 / (255 * 0.224) = 0.0175 for
ImageNet's std): evaluation batches equal the PIL path's up to float32 rounding of the
normalisation (max 2.4e-7 for sizes 24/28, 20/20, 40/48); training batches, border included, too
(max and mean difference 0 for sizes 16, 24, 48 and 64, seeds 0, 1 and 3): the device path
re-implements PIL's resize. The tests allow one level (JPEG decoder builds may differ).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from bip_fast.data.device_decode import _pil_resize, to_chw
from bip_fast.data.folder import IMAGENET_STD, FolderLoader, load_folder_dataset, scan

from test_imagefolder import imagenet_tree, tiny_tree

pytest.importorskip("torchvision")

LEVEL = 1 / (255 * min(IMAGENET_STD))  # one pixel level in normalised units


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_tree(tmp_path_factory.mktemp("dd") / "tiny", per_class=8, val_per_class=4)


def both(samples, bs, **kw):
    """(batches of the PIL path, batches of the device path, the device loader)."""
    dev = FolderLoader(samples, bs, decode="device", **kw)
    return list(FolderLoader(samples, bs, **kw)), list(dev), dev


def diffs(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and xa.shape == xb.shape and xb.dtype == torch.float32
    return torch.cat([(xa - xb).abs() for (xa, _), (xb, _) in zip(a, b)])


def test_eval_batches_match_the_pil_path(tiny):
    samples, _ = scan("tiny-imagenet", tiny, "val")
    for size, resize in ((24, 28), (20, 20), (40, 48)):
        a, b, ld = both(samples, 5, train=False, size=size, eval_resize=resize)
        d = diffs(a, b)
        assert d.max() <= LEVEL * 1.001 and d.mean() < 0.005, (size, d.max(), d.mean())
        assert ld.decoder.fallbacks == 0 and ld.skipped == 0


@pytest.mark.parametrize("size", [24, 48])
def test_train_batches_same_labels_crops_and_flips(tiny, size):
    samples, _ = scan("tiny-imagenet", tiny, "train")
    a, b, ld = both(samples, 4, train=True, size=size, eval_resize=size, seed=3)
    d = diffs(a, b)  # same labels in the same order, same skipped corrupt file
    assert ld.skipped == 1
    # a different crop box or flip would move every pixel; the box resize is PIL's, border included
    assert d.max() <= LEVEL * 1.001 and d.mean() < 0.005, (d.max(), d.mean())


@pytest.mark.parametrize("shape,box,out", [  # (H, W), (left, top, width, height), (h, w)
    ((64, 64), (0, 0, 64, 64), (20, 60)),    # both axes shrink, Pillow 13 resamples vertically first
    ((61, 47), (3, 5, 40, 50), (24, 24)),    # a training crop inside the image
    ((40, 90), (0, 0, 7, 9), (48, 48)),      # upscaling, box at the top-left corner
    ((50, 30), (20, 30, 10, 20), (16, 33)),  # box at the bottom-right corner
    ((375, 500), (113, 41, 301, 266), (224, 224)),
])
def test_box_resize_is_pils(shape, box, out):
    """The device training resize equals ``Image.resize(..., BILINEAR, box=...)`` exactly, taps
    outside the box and PIL's per-pass uint8 rounding included."""
    arr = np.random.default_rng(sum(box)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    left, top, bw, bh = box
    img = Image.fromarray(arr, "RGB")
    want = to_chw(img.resize(out[::-1], Image.BILINEAR, box=(left, top, left + bw, top + bh)))
    got = _pil_resize(to_chw(img), box, *out)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_gray_cmyk_and_png_decode(tiny, tmp_path):
    samples, _ = scan("tiny-imagenet", tiny, "train")
    samples = [s for s in samples if "broken" not in s[0]]  # RGB, L and CMYK JPEGs
    a, b, ld = both(samples, 8, train=False, size=24, eval_resize=28)
    assert diffs(a, b).max() <= LEVEL * 1.001
    assert ld.decoder.fallbacks == 0  # libjpeg converts gray and CMYK itself
    png, _ = scan("imagenet", imagenet_tree(tmp_path / "in"), "train")
    assert sum(p.endswith(".png") for p, _ in png) == 2
    a, b, ld = both(png, 3, train=False, size=24, eval_resize=28)
    assert diffs(a, b).max() <= LEVEL * 1.001
    assert ld.decoder.fallbacks == 2 and ld.skipped == 0  # the PNGs went through PIL on the host


@pytest.mark.parametrize("refuse", ["batch", "all"])
def test_host_fallback_when_the_device_decoder_refuses(tiny, refuse):
    """A device decoder that refuses the batched call (then each image is decoded alone) or every
    image (CMYK on nvJPEG, say): same batches, via PIL on the host for the refused ones."""
    samples, _ = scan("tiny-imagenet", tiny, "train")
    kw = dict(train=True, size=24, eval_resize=24, seed=1)
    ld = FolderLoader(samples, 4, decode="device", **kw)
    real = ld.decoder._decode_jpeg

    def picky(data):
        if refuse == "all" or isinstance(data, list):
            raise RuntimeError("refused")
        return real(data)
    ld.decoder._decode_jpeg = picky
    want = list(FolderLoader(samples, 4, decode="device", **kw))
    got = list(ld)
    assert len(got) == len(want)
    for (xa, ya), (xb, yb) in zip(got, want):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert ld.skipped == 1
    assert ld.decoder.fallbacks == (0 if refuse == "batch" else sum(y.numel() for _, y in got))


def test_corrupt_jpeg_is_skipped_and_counted(tiny):
    samples, _ = scan("tiny-imagenet", tiny, "train")
    ld = FolderLoader(samples, len(samples), train=False, size=24, eval_resize=28, decode="device")
    (x, y), = list(ld)
    assert x.shape[0] == len(samples) - 1 and ld.skipped == 1 and ld.state_dict()["skipped"] == 1
    broken = [s for s in samples if "broken" in s[0]]
    ld = FolderLoader(broken * 2, 2, train=False, size=24, eval_resize=28, decode="device")
    assert list(ld) == [] and ld.skipped == 2 and ld.epoch == 1  # a batch of only bad files: nothing


@pytest.mark.parametrize("bad", ["gpu", "CPU", "", None, 1])
def test_bad_decode_values(tiny, bad):
    samples, _ = scan("tiny-imagenet", tiny, "val")
    with pytest.raises(ValueError, match="decode"):
        FolderLoader(samples, 2, train=False, size=24, eval_resize=28, decode=bad)


def test_resume_workers_and_channels_last(tiny):
    ds = load_folder_dataset("tiny-imagenet", tiny)
    ld = ds.train_loader(4, seed=5, decode="device")
    assert len(ld) == 6 and ld.decode == "device"
    full, skipped0 = list(ld), ld.skipped
    assert skipped0 in (0, 1) and sum(y.numel() for _, y in full) == 24 - skipped0  # 25 files, drop_last
    it = iter(ld)
    for _ in range(3):
        next(it)
    state = ld.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    ref = list(it)
    again = ds.train_loader(4, seed=5, decode="device", num_workers=2, channels_last=True)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(ref) == 3 and again.skipped == ld.skipped
    for (xa, ya), (xb, yb) in zip(ref, rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.is_contiguous(memory_format=torch.channels_last)
    assert ds.test_loader(6, decode="device").decoder is not None
