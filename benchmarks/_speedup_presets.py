"""Regimes of ``benchmarks/speedup.py``: the paper's schedule proportions, the presets (model,
data subset, dense epochs, seeds), the methods and the BiP methods' hyper-parameters."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

try:  # imported as part of a package (python -m benchmarks.speedup)
    from . import _speedup_report as R
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _speedup_report as R  # type: ignore[no-redef]

from bip_fast.pruning.bip import PAPER_HPARAMS as BIP_PAPER_HPARAMS
from bip_fast.pruning.bip import PAPER_SCORE_STEPS

# paper proportions (epochs of the paper's schedules, SPEC §4-5, bip_fast/engine/sections.py)
PAPER_DENSE_EPOCHS = 160
BIP_FRACTION = 100 / 160
HYDRA_SCORE_FRACTION = 20 / 160
HYDRA_FINETUNE_FRACTION = 100 / 160
REWIND_FRACTION = 3 / 160
IMP_RATE = R.IMP_RATE
TARGET_ROUNDS = R.TARGET_ROUNDS

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-core CPU: <= 10 minutes; one GPU: well under 3 minutes. Not converged: a smoke run.
    "quick": {"arch": "resnet8", "train_subset": 4096, "test_subset": 2000, "dense_epochs": 6,
              "batch_size": 128, "seeds": 1},
    # 2-core CPU, the equal-accuracy regime: a dense start that is converged (checked on every
    # seed, on the validation split: 1.5x the dense steps gains < 0.5 points), every tuned method
    # on the whole curve (IMP rounds 3-18: 48.8% to 98.2%), 5 seeds. Why these choices: with the
    # standard crop+flip augmentation, ResNet-8 on 2,000-4,000 images still gains ~4 points from
    # 1.5x more epochs at every budget that fits the hour per seed (augmented CIFAR needs 100+
    # epochs to converge), so IMP's retrainings would again be mostly more training. Without
    # augmentation, 4,000 class-balanced images (400 per class) converge in 18 epochs (558 steps):
    # 1.5x as many steps no longer helps. ResNet-8 (74,800 prunable weights) is the largest CIFAR
    # ResNet that runs ~950 images/s on 2 cores. Every choice (hyper-parameters from GRIDS, the
    # time-to-accuracy crossing, convergence) is made on a 5,000-image class-balanced validation
    # split held out of the other 46,000 training images (standard error of an accuracy near 60%:
    # ~0.7 points; one image is 0.02), evaluated at 8 points of every run; the full 10,000-image
    # test set only reports. About 5 hours on 2 cores: run it with --max-minutes and --resume.
    "cpu": {"arch": "resnet8", "train_subset": 4000, "test_subset": None, "val": 5000, "dense_epochs": 18,
            "batch_size": 128, "augment": False, "seeds": 5, "eval_points": 8, "check_convergence": "all",
            "tune": True, "target_rounds": (3, 6, 9, 12, 15, 18),
            "methods": ("imp", "bip_alternating", "bip_fused", "omp", "hydra", "gmp")},
    # one H100: about 20-25 minutes; run it in pieces with --max-minutes 9 --resume.
    "mid": {"arch": "resnet20", "train_subset": None, "test_subset": None, "dense_epochs": 16,
            "batch_size": 128, "seeds": 1},
    # the paper's schedules: many GPU hours.
    "paper": {"arch": "resnet18", "train_subset": None, "test_subset": None, "dense_epochs": 160,
              "batch_size": 128, "seeds": 1},
}
# run in this order (method by method over all seeds), so an interrupted run has the main comparison
METHODS = ("imp", "bip_alternating", "bip_fused", "omp", "hydra", "gmp", "bip_official", "snip", "grasp",
           "synflow", "bip_paper")
AT_INIT = ("snip", "grasp", "synflow")  # pruned at the dense run's initialisation, then trained D steps
# the cut's batch, drawn per seed: SNIP one random batch, GraSP 10 images per class, SynFlow a shape
SCORE_SAMPLES = {"snip": 128, "grasp": 100, "synflow": 1}
BIP_METHODS = tuple(m for m in METHODS if m.startswith("bip"))
LABELS = R.LABELS
CONVERGENCE_FACTOR = 1.5  # the longer dense run of the convergence check
PAPER_BIP_STEPS = PAPER_SCORE_STEPS  # the paper's BiP schedule: 100 epochs of 391 steps (CIFAR-10, batch 128)
# BiP methods: constructor arguments (momentum 0.9 and total_steps are added by make_algorithm).
PAPER_HPARAMS = {"variant": "paper", "schedule": "alternating", **BIP_PAPER_HPARAMS}
# bip_fast's defaults (docs/equal_accuracy.md): the weight lr of dense training, and score_lr=None,
# which BiP resolves to scaled_score_lr(total_steps) (the paper's score lr x steps at any length).
DEFAULT_HPARAMS = dict(PAPER_HPARAMS, lr=0.1, score_lr=None)
BIP_CONFIGS: Dict[str, Dict[str, Any]] = {
    "bip_alternating": dict(DEFAULT_HPARAMS),
    "bip_fused": dict(DEFAULT_HPARAMS, schedule="fused"),
    # the authors' effective update (SPEC §6): both levels at the weight lr (0.1, cosine)
    "bip_official": {"variant": "official", "lr": 0.1, "weight_decay": 1e-4, "lr2": 1e-4},
    "bip_paper": dict(PAPER_HPARAMS),
}

# Hyper-parameters of the methods (the constructor arguments the benchmark sets; BiP's are above).
# The tuned methods take these as the first point of their grid.
BASE_HPARAMS: Dict[str, Dict[str, Any]] = {
    "imp": {"lr": 0.1, "weight_decay": 5e-4},
    "omp": {"lr": 0.1, "weight_decay": 5e-4},
    "gmp": {"lr": 0.1, "weight_decay": 5e-4},
    # global like every other method here (Hydra's own default is layer-wise, which at high
    # sparsity starves the small stem and classifier)
    "hydra": {"score_lr": 0.1, "lr": 0.01, "weight_decay": 5e-4, "structure": "global"},
    "snip": {"lr": 0.1, "weight_decay": 5e-4},
    "grasp": {"lr": 0.1, "weight_decay": 5e-4},
    "synflow": {"lr": 0.1, "weight_decay": 5e-4},
}
# Equal tuning budget (presets with "tune"): every tuned method tries 4 configurations at
# TUNE_ROUND (48.8%), seed TUNE_SEED, and keeps the one with the highest final validation
# accuracy (ties: the earlier in the list); the choice then serves every target and seed.
# "scaled" is a score learning rate scaled to the schedule so that score lr x score steps equals
# the paper's (BiP: 0.1 x 100 epochs x 391 steps; Hydra: 0.1 x 20 epochs x 391 steps).
# BiP (fused) is the same algorithm on the other schedule: it takes BiP (alternating)'s choice.
TUNE_ROUND = 3
TUNE_SEED = 0
PAPER_HYDRA_SCORE_STEPS = 20 * 391
_MAGNITUDE_GRID = [{"lr": lr, "weight_decay": wd} for lr in (0.1, 0.03) for wd in (5e-4, 1e-4)]
GRIDS: Dict[str, List[Dict[str, Any]]] = {
    "imp": _MAGNITUDE_GRID,
    "bip_alternating": [{"lr": lr, "score_lr": s} for lr in (0.1, 0.01) for s in ("scaled", 0.1)],
    "omp": _MAGNITUDE_GRID,
    "gmp": _MAGNITUDE_GRID,
    "hydra": [{"score_lr": s, "lr": lr} for s in (0.1, "scaled") for lr in (0.01, 0.1)],
}
TUNE_SHARES = {"bip_fused": "bip_alternating"}
