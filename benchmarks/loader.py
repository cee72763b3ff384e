"""Folder loader throughput: bip_fast's FolderLoader against torchvision's plain ImageFolder.

Both read the same ImageNet-layout JPEG folder (``--data-dir``, or a tree generated here with
ImageNet-like image sizes) with the same batch size, worker count and training augmentation
(random resized crop to ``--size``, horizontal flip), and deliver normalised float32 batches on
the target device. The baseline is the usual plain pipeline: ``ImageFolder`` +
``Compose([RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize])`` + ``DataLoader``
(pinned memory on a GPU). bip_fast ships uint8 batches from the workers and normalises on the
device (``--decode cpu``, the default), or with ``--decode device`` has the workers read only the
files' bytes and decodes, crops and normalises on the device (nvJPEG on a GPU); ``--decode both``
times both modes, one row each, against the same torchvision baseline.

Correctness first: the evaluation preprocessing (resize + centre crop) must equal torchvision's
on the first images, and with ``--decode device`` the training batches must match the PIL path's
(``--decode cpu``), else the script exits with status 1. The device path's resizes are PIL's; so
on a CPU device (libjpeg, as PIL) no pixel may differ by more than one level (the allowance covers
JPEG decoder builds), on a GPU (nvJPEG, which decodes slightly differently) the mean difference
must stay within one level. Timing: one untimed
warm-up epoch per loader (worker start-up of later epochs is counted, as in training), then
``--repeats`` epochs per loader, interleaved, each ended by a device synchronisation; reported
as images/s from the median epoch time (with p20 / p80), and the speedup over torchvision.

    python benchmarks/loader.py --quick
    python benchmarks/loader.py --data-dir /data/imagenet --images 5000 --workers 8 --json out.json
    python benchmarks/loader.py --decode both --workers 8      # on a GPU: PIL workers vs nvJPEG
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Row, Timing, environment, format_header, log, markdown_table, synchronize, write_json  # noqa: E402

from bip_fast.data.folder import IMAGENET_MEAN, IMAGENET_STD, FolderLoader, scan  # noqa: E402


def generate_tree(root: Path, n_images: int, classes: int = 10, seed: int = 0) -> Path:
    """An ImageNet-layout folder of smooth random JPEGs with ImageNet-like sizes (~500x375)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (333, 500)]
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        small = torch.randint(0, 256, (h // 16, w // 16, 3), generator=g, dtype=torch.uint8)
        img = Image.fromarray(small.numpy(), "RGB").resize((w, h), Image.BILINEAR)
        for split in ("train", "val") if i < classes * 2 else ("train",):
            path = root / split / f"c{i % classes:03d}" / f"{i:06d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, "JPEG", quality=90)
    return root


def check_eval_matches_torchvision(root: Path, size: int, decode: str = "cpu", device="cpu") -> Tuple[float, float]:
    """(max, mean) absolute difference in [0, 1] pixel units from torchvision's Resize + CenterCrop."""
    import torchvision.transforms as T
    from PIL import Image

    samples = scan("imagenet", root, "val")[0][:8]
    resize = round(size / 0.875)
    ld = FolderLoader(samples, len(samples), train=False, size=size, eval_resize=resize,
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), decode=decode, device=device)
    got = next(iter(ld))[0].cpu()
    tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])
    want = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in samples]).float() / 255
    d = (got - want).abs()
    return float(d.max()), float(d.mean())


def check_train_matches_pil(root: Path, size: int, device) -> Tuple[float, float]:
    """(max, mean) absolute difference in [0, 1] pixel units of decode="device"'s first training
    batch from decode="cpu"'s (the same crops and flips)."""
    samples = scan("imagenet", root, "train")[0][:8]
    kw = dict(train=True, size=size, eval_resize=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed=0)
    want = next(iter(FolderLoader(samples, len(samples), **kw)))[0]
    got = next(iter(FolderLoader(samples, len(samples), decode="device", device=device, **kw)))[0].cpu()
    d = (got - want).abs()
    return float(d.max()), float(d.mean())


def device_agrees(err: Tuple[float, float], device) -> bool:
    """The agreement with PIL's preprocessing that decode="device" keeps (see the module's notes)."""
    return err[0] <= 1.001 / 255 if device.type == "cpu" else err[1] <= 1 / 255


def bip_fast_epoch(samples, args, device, decode="cpu"):
    ld = FolderLoader(samples, args.batch_size, train=True, size=args.size, eval_resize=round(args.size / 0.875),
                      seed=0, num_workers=args.workers, device=device, decode=decode)

    def run():
        n = 0
        for x, _ in ld:
            n += x.shape[0]
        synchronize(device)
        return n
    return run


def torchvision_epoch(root: Path, args, device):
    import torchvision.datasets as D
    import torchvision.transforms as T

    tf = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = D.ImageFolder(str(root / "train"), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, pin_memory=device.type == "cuda")

    def run():
        n = 0
        for x, _ in dl:
            x = x.to(device, non_blocking=True)
            n += x.shape[0]
        synchronize(device)
        return n
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="ImageNet-layout folder (train/<class>/*.JPEG); default: generated")
    p.add_argument("--images", type=int, default=1024, help="images to generate (without --data-dir)")
    p.add_argument("--size", type=int, default=224, help="training crop size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per loader")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decode", choices=("cpu", "device", "both"), default="cpu",
                   help="bip_fast's decode mode: PIL in the workers (cpu), decode_jpeg on --device, or both")
    p.add_argument("--quick", action="store_true", help="128 generated images, 2 timed epochs")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = min(args.images, 128), min(args.repeats, 2)
    device = torch.device(args.device)
    env = environment(device)
    print(format_header(env, "Folder loader throughput (images/s)"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else generate_tree(Path(tmp), args.images)
        modes = ("cpu", "device") if args.decode == "both" else (args.decode,)
        errs = {}
        for m in modes:
            errs[m] = check_eval_matches_torchvision(root, args.size, m, device if m == "device" else "cpu")
            # the PIL path equals torchvision's; the device path's decoder (nvJPEG) may differ slightly
            bad = errs[m][0] > 1e-6 if m == "cpu" else not device_agrees(errs[m], device)
            if bad:
                log(f"FAIL: decode={m}: evaluation preprocessing differs from torchvision's by max {errs[m][0]}, "
                    f"mean {errs[m][1]}")
                return 1
        train_err = check_train_matches_pil(root, args.size, device) if "device" in modes else None
        if train_err is not None and not device_agrees(train_err, device):
            log(f"FAIL: decode=device: training batches differ from the PIL path's by max {train_err[0]}, "
                f"mean {train_err[1]}")
            return 1
        samples = scan("imagenet", root, "train")[0]
        runs = {f"bip_fast decode={m}": bip_fast_epoch(samples, args, device, m) for m in modes}
        runs["torchvision"] = torchvision_epoch(root, args, device)
        times = {k: [] for k in runs}
        count = {k: fn() for k, fn in runs.items()}  # warm-up epoch (page cache, worker import)
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    rows, ips = [], {}
    for k, ts in times.items():
        t = Timing.from_samples(ts, "perf_counter, epoch end synchronised")
        ips[k] = count[k] / (t.median_ms / 1e3)
        rows.append(Row("loader epoch", k, f"{count[k]} img, bs {args.batch_size}, {args.workers} workers, "
                        f"size {args.size}", timing=t, metric=f"{ips[k]:.0f} img/s", metrics={"images_per_s": ips[k]}))
    speedups = {m: ips[f"bip_fast decode={m}"] / ips["torchvision"] for m in modes}
    for row, m in zip(rows, modes):
        row.metric += f", {speedups[m]:.2f}x"
        row.add_target("speedup over torchvision", speedups[m], ">=", 1.0)
    print(markdown_table(rows))
    if args.json:
        write_json(args.json, benchmark="loader", env=env, config=vars(args), rows=rows,
                   extra={"eval_max_abs_diff": errs[modes[0]][0], "speedup": speedups[modes[0]],
                          "eval_abs_diff": {m: {"max": e[0], "mean": e[1]} for m, e in errs.items()},
                          "train_abs_diff_device": train_err and {"max": train_err[0], "mean": train_err[1]},
                          "speedups": speedups})
    return 0


if __name__ == "__main__":
    sys.exit(main())
