"""Write a class-balanced CIFAR-10 subset in the python-pickle layout, small enough to travel.

The whole CIFAR-10 (176 MB of pickles) is larger than the 64 MiB of checkout that is copied to a
lent GPU machine, so scripts/gpu_check.sh reads a subset copied along in an ignored folder. Every
file of the original layout is written (data_batch_1..5 and test_batch, the files
bip_fast.data.load_dataset requires), each keeping the first images of every class of
its source batch in their original order, plus batches.meta and SUBSET.txt (the counts; its
presence tells gpu_check.sh that this is a subset, not the whole set).

    python3 scripts/cifar_subset.py                     # ../shared/data/cifar10 -> data/cifar10-gpu
    python3 scripts/cifar_subset.py --train 10000 --test 5000 --src DIR --dst DIR

Default: 10,000 training images (2,000 per batch file) and 5,000 test images, 46 MB.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "cifar-10-batches-py"
TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST = ("test_batch",)
CLASSES = 10


def batches_dir(path: str) -> str:
    """The folder holding the pickles: ``path`` itself or ``path``/cifar-10-batches-py."""
    inner = os.path.join(path, BASE)
    return inner if os.path.isdir(inner) else path


def pick(labels: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the first ``n // 10`` images of each class (one more for the first
    ``n % 10`` classes)."""
    base, extra = divmod(n, CLASSES)
    idx = []
    for c in range(CLASSES):
        want = base + (1 if c < extra else 0)
        hits = np.flatnonzero(labels == c)
        if hits.size < want:
            raise ValueError(f"class {c}: {want} images wanted, the batch holds {hits.size}")
        idx.append(hits[:want])
    return np.sort(np.concatenate(idx))


def write_subset(src: str, dst: str, n_train: int, n_test: int) -> int:
    """Write the subset; returns the number of bytes written."""
    if n_train % len(TRAIN):
        raise ValueError(f"--train: expected a multiple of {len(TRAIN)} (one share per batch file), got {n_train}")
    src_dir = batches_dir(src)
    out_dir = os.path.join(dst, BASE)
    os.makedirs(out_dir, exist_ok=True)
    total = 0
    for files, n in ((TRAIN, n_train // len(TRAIN)), (TEST, n_test)):
        for name in files:
            with open(os.path.join(src_dir, name), "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry["labels"], dtype=np.int64)
            keep = pick(labels, n)
            out = {"batch_label": f"{entry.get('batch_label', name)} (subset of {keep.size})",
                   "labels": labels[keep].tolist(), "data": np.ascontiguousarray(data[keep])}
            path = os.path.join(out_dir, name)
            with open(path, "wb") as f:
                pickle.dump(out, f, protocol=4)
            total += os.path.getsize(path)
    meta = os.path.join(src_dir, "batches.meta")
    if os.path.isfile(meta):
        shutil.copyfile(meta, os.path.join(out_dir, "batches.meta"))
    with open(os.path.join(dst, "SUBSET.txt"), "w") as f:
        f.write(f"CIFAR-10 subset written by scripts/cifar_subset.py from {os.path.abspath(src_dir)}: "
                f"{n_train} training images ({n_train // len(TRAIN)} per batch file), {n_test} test images, "
                f"class-balanced, original order.\n")
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                   help="folder holding cifar-10-batches-py (or that folder)")
    p.add_argument("--dst", default=os.path.join(ROOT, "data", "cifar10-gpu"),
                   help="output folder (cifar-10-batches-py/ and SUBSET.txt go inside)")
    p.add_argument("--train", type=int, default=10000, help="training images (multiple of 5)")
    p.add_argument("--test", type=int, default=5000, help="test images")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(batches_dir(args.src), "test_batch")):
        print(f"cifar_subset: no CIFAR-10 pickles in {args.src}", file=sys.stderr)
        return 2
    try:
        size = write_subset(args.src, args.dst, args.train, args.test)
    except ValueError as e:
        print(f"cifar_subset: {e}", file=sys.stderr)
        return 2
    print(f"cifar_subset: wrote {args.train} + {args.test} images ({size / 2**20:.1f} MiB) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
