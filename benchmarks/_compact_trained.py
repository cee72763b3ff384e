"""The trained models of ``benchmarks/compact.py``: a CIFAR ResNet trained briefly on real CIFAR-10,
then pruned two ways from the same weights: BiP with group masks (``masks="bip"``) and one-shot
magnitude group masks (``masks="one-shot"``, OMP without retraining), so that the "bip" rows
have a one-shot twin on the same trained weights.

Recipe (``Recipe``; every field lands in the JSON), sized for a 2-vCPU machine (500
forward/backward passes of ResNet-20 at batch 64 in all, about 2.5 minutes on one busy vCPU): a
class-balanced subset of 5,000 training images (augmented: 4-pixel crop, flip),
``bip_fast.Dense`` (SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine) for 300 steps (about 4
epochs), then ``bip_fast.BiP(model, 0.5, structure="group", total_steps=100)`` with the package's
score-lr rule resolved explicitly (0.1 x 39,100 / 100 = 39.1; a score lr of 0.1 over 100 steps,
tried first, left the mask exactly where |θ| put it, so its "bip" rows were one-shot masks in all
but name); lr 0.1 and the rest the package's defaults; scores start from |θ|) on pairs of batches from two
independent shuffles (:class:`bip_fast.data.BilevelLoader`). Test accuracy on a class-balanced
2,000-image test subset is measured for the dense model and both masked models (no finetuning
after the masks), and the share of BiP's kept filters that the one-shot mask keeps too (how far
BiP moved from |θ|).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

try:  # imported as part of a package (python -m benchmarks.compact)
    from . import _common as C
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]

import bip_fast
from bip_fast.data import BilevelLoader, load_dataset
from bip_fast.models import build
from bip_fast.masks import kept_units
from bip_fast.nn import masked_modules
from bip_fast.pruning.bip import scaled_score_lr


@dataclass(frozen=True)
class Recipe:
    arch: str = "resnet20"
    train_images: int = 5000
    test_images: int = 2000
    batch_size: int = 64
    dense_steps: int = 300
    dense_lr: float = 0.1
    dense_weight_decay: float = 5e-4
    bip_steps: int = 100
    bip_score_lr: Optional[float] = None  # None: the package's rule (0.1 x 39,100 / bip_steps)
    sparsities: Tuple[float, ...] = (0.5,)
    seed: int = 0


QUICK = Recipe(train_images=256, test_images=200, batch_size=32, dense_steps=3, bip_steps=2, bip_score_lr=0.1)


@torch.inference_mode()
def accuracy(model: nn.Module, ds) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in ds.test_loader(500):
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += int(y.numel())
    model.train(was)
    return correct / max(total, 1)


def _kept_filters(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for name, mod in masked_modules(model):
        out[name] = kept_units(mod.mask, getattr(mod, "out_dim", 0))
    return out


def shared_kept(a: nn.Module, b: nn.Module) -> float:
    """Fraction of ``a``'s kept filters that ``b`` keeps too (masked conv / linear layers)."""
    ka, kb = _kept_filters(a), _kept_filters(b)
    both = sum(int((ka[n] & kb[n]).sum()) for n in ka)
    return both / max(sum(int(ka[n].sum()) for n in ka), 1)


def train(data_dir, recipe: Recipe, example: torch.Tensor) -> Tuple[nn.Module, List[Dict[str, Any]], Dict[str, Any]]:
    """(trained dense model, [{"masks", "structure", "sparsity", "model", "test_acc", ...}], info)."""
    t0 = time.monotonic()
    ds = load_dataset("cifar10", data_dir, subset=(recipe.train_images, recipe.test_images), seed=recipe.seed,
                      download=False)
    torch.manual_seed(recipe.seed)
    dense = build(recipe.arch)
    alg = bip_fast.Dense(dense, lr=recipe.dense_lr, momentum=0.9, weight_decay=recipe.dense_weight_decay,
                         total_steps=recipe.dense_steps)
    loader = iter(_forever(ds.train_loader(recipe.batch_size, seed=recipe.seed)))
    dense.train()
    for _ in range(recipe.dense_steps):
        alg.step(next(loader))
    dense.eval()
    dense_s = time.monotonic() - t0
    info: Dict[str, Any] = {"recipe": asdict(recipe), "data_dir": str(data_dir), "dense_test_acc": accuracy(dense, ds),
                            "dense_train_seconds": dense_s}
    C.log(f"[compact] {recipe.arch} dense: {recipe.dense_steps} steps in {dense_s:.0f} s, "
          f"test acc {info['dense_test_acc']:.4f}")
    pruned = []
    for s in recipe.sparsities:
        one = copy.deepcopy(dense)
        bip_fast.attach_groups(one, example)
        one_shot = bip_fast.OMP(one, s, structure="group").model.eval()
        t1 = time.monotonic()
        model = copy.deepcopy(dense)
        bip_fast.attach_groups(model, example)
        torch.manual_seed(recipe.seed)
        lr_s = scaled_score_lr(recipe.bip_steps) if recipe.bip_score_lr is None else recipe.bip_score_lr
        bip = bip_fast.BiP(model, s, structure="group", total_steps=recipe.bip_steps, score_lr=lr_s)
        pairs = iter(_forever(BilevelLoader(ds.train_loader(recipe.batch_size, seed=recipe.seed + 1000),
                                            ds.train_loader(recipe.batch_size, seed=recipe.seed + 2000))))
        model.train()
        for _ in range(recipe.bip_steps):
            lower, upper = next(pairs)
            bip.step(lower, upper)
        masked = bip.model.eval()
        bip_s = time.monotonic() - t1
        shared = shared_kept(masked, one_shot)
        for masks, m, extra in (("one-shot", one_shot, {}),
                                ("bip", masked, {"bip_steps": recipe.bip_steps, "train_seconds": bip_s,
                                                 "kept_filters_shared_with_one_shot": shared})):
            pruned.append({"masks": masks, "structure": "group", "sparsity": s, "model": m,
                           "test_acc": accuracy(m, ds), **extra})
        C.log(f"[compact] {recipe.arch} BiP group {s:.0%}: {recipe.bip_steps} steps in {bip_s:.0f} s, test acc "
              f"{pruned[-1]['test_acc']:.4f} (one-shot {pruned[-2]['test_acc']:.4f}); {shared:.1%} of its kept "
              f"filters are the one-shot mask's")
    return dense, pruned, info


def _forever(loader):
    while True:
        yield from loader


def data_available(data_dir) -> bool:
    from bip_fast.data.cifar import resolve_data_dir

    _, folder = resolve_data_dir("cifar10", data_dir)
    return (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file()


__all__ = ["Recipe", "QUICK", "train", "accuracy", "shared_kept", "data_available"]
