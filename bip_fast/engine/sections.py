"""The hyper-parameter sections and the per-method defaults, with their sources.

Paper settings (docs: ../shared/SPEC.md §4-6; Zhang et al. 2022, "Advancing Model Pruning via
Bi-level Optimization", appendix):

- BiP: 100 epochs, gamma 1.0, SGD momentum 0.9, weight decay 1e-4 (the authors' configs), batch
  128, cosine schedule (SPEC §4). The paper's text gives lower-level (weight) lr 0.01 and score lr
  0.1 (``configs/bip_paper_resnet18_cifar10.yaml``); bip_fast's defaults are weight lr 0.1 (the
  dense rate, and what the authors' code ran) and score lr 0.1 x 39,100 / the run's steps (the
  paper's 0.1 on its own 39,100-step schedule, the same product of rate and steps on a shorter
  one), which docs/equal_accuracy.md measured to win.
- Dense training (``pretrain``, and the dense phase ``prune`` runs without ``--pretrained``): its
  length depends on the dataset (``DENSE_EPOCHS``): CIFAR-10/100 160 epochs (the usual CIFAR ResNet
  schedule the paper's baselines follow), Tiny-ImageNet 200 (the authors' Tiny-ImageNet
  pretraining config), ImageNet 90 (the standard ResNet-50 recipe; configs/dense_*.yaml).
- Dense / IMP / OMP (re)training: lr 0.1, momentum 0.9, batch 128, cosine, 160 epochs (the
  usual CIFAR ResNet schedule the paper's baselines follow), weight decay 5e-4 (our choice: the
  common CIFAR value for dense training; the authors' BiP configs use 1e-4 — pass
  ``--weight-decay 1e-4`` to match them). IMP prunes 20% of the remaining weights per round
  (SPEC §5) and rewinds to the start of epoch ``rewind_epoch`` (default 3) of the dense run: its
  own round 0, or with ``--pretrained RUN`` the weights RUN's ``pretrain`` kept in ``rewind.pt``.
- Hydra: score phase 20 epochs at score lr 0.1, then finetuning 100 epochs at lr 0.01 (Sehwag et
  al. 2020 CIFAR settings), weight decay 5e-4 (Hydra's default), layer-wise structure.
- SNIP / GraSP / SynFlow (pruning at initialisation, :mod:`bip_fast.engine.baselines`): the
  dense training schedule (160 epochs, lr 0.1, weight decay 5e-4) after the one-shot cut; GraSP
  temperature 200 and 10 samples per class, SynFlow 100 rounds (the published settings).
- GMP: 100 epochs (BiP's budget, our choice) at lr 0.1, weight decay 5e-4, the cubic schedule
  over the first half of the run and Δt = 100 steps (Zhu & Gupta 2017), then finetuning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from ..data import cifar
from ..data.folder import FOLDER_DATASETS
from ..masks import STRUCTURES  # every mask structure the projection knows
from ..pruning._scores import SCORE_INITS  # BiP's score initialisations
from ..pruning.bip import SCHEDULES, VARIANTS  # BiP's schedules and variants

__all__ = [
    "METHODS", "COMMANDS", "STRUCTURES", "VARIANTS", "SCHEDULES", "SCORE_INITS", "CIFAR_DATASETS",
    "FOLDER_DATASETS", "DATASETS", "METHOD_DEFAULTS", "DENSE_EPOCHS", "dense_epochs", "DataHparams", "ModelHparams", "PruneHparams",
    "TrainHparams", "SECTIONS", "FIELD_SECTION", "BUDGET_METHODS", "check_budget_flags",
]

METHODS = ("bip", "imp", "omp", "hydra", "dense", "snip", "grasp", "synflow", "gmp")
COMMANDS = ("pretrain", "prune", "finetune", "eval", "export")
CIFAR_DATASETS = cifar.DATASETS  # python-pickle batches (bip_fast.data.cifar)
DATASETS = CIFAR_DATASETS + FOLDER_DATASETS

# Values a field left at None takes, per method (see the module docstring for the sources).
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "bip": {"epochs": 100, "lr": 0.1, "weight_decay": 1e-4, "structure": "global"},
    "dense": {"epochs": 160, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
    "imp": {"epochs": 160, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
    "omp": {"epochs": 160, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
    "hydra": {"epochs": 100, "lr": 0.01, "weight_decay": 5e-4, "structure": "layer"},
    "snip": {"epochs": 160, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
    "grasp": {"epochs": 160, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
    "synflow": {"epochs": 160, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
    "gmp": {"epochs": 100, "lr": 0.1, "weight_decay": 5e-4, "structure": "global"},
}


# Epochs of the dense schedule per dataset (see the module docstring); any other dataset: CIFAR's.
DENSE_EPOCHS: Dict[str, int] = {"cifar10": 160, "cifar100": 160, "tiny-imagenet": 200, "imagenet": 90}


def dense_epochs(dataset: str) -> int:
    """Default length of dense training on ``dataset`` (cifar-10 and cifar10 alike)."""
    name = str(dataset).lower()
    return DENSE_EPOCHS.get(name, DENSE_EPOCHS.get(name.replace("-", ""), DENSE_EPOCHS["cifar10"]))


def _f(default, help: str, **meta):
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataHparams:
    dataset: str = _f("cifar10", "dataset: cifar10, cifar100, tiny-imagenet or imagenet")
    data_dir: Optional[str] = _f(None, "folder holding cifar-10-batches-py (default: $BIP_FAST_DATA or ./data); "
                                       "tiny-imagenet/imagenet: the dataset's root (train/, val/)")
    workers: int = _f(0, "tiny-imagenet/imagenet: JPEG decoding processes (0: in the training process)")
    batch_size: int = _f(128, "global training batch size (all ranks together)")
    test_batch_size: int = _f(500, "evaluation batch size")
    subset: Optional[Tuple[int, int]] = _f(None, "class-balanced subset N_TRAIN N_TEST for quick runs",
                                           nargs=2, metavar=("N_TRAIN", "N_TEST"))
    channels_last: bool = _f(False, "channels_last memory format for images and conv weights")


@dataclass
class ModelHparams:
    arch: str = _f("resnet18", "architecture: resnet20/32/44/56/110, resnet18, vgg16_bn or tv_<name>")
    pretrained: Optional[str] = _f(None, "prune: dense model to start from (model.pt, checkpoint.pt or a run folder)")


@dataclass
class PruneHparams:
    method: str = _f("bip", "bip, imp, omp, hydra, dense, snip, grasp, synflow or gmp")
    sparsity: float = _f(0.9, "fraction of prunable weights removed, in [0, 1)")
    macs: Optional[float] = _f(None, "--structure group (bip, omp, imp, hydra): keep at most this fraction of the dense "
                                     "model's MACs on the data's input size instead of --sparsity, channels ranked "
                                     "across all groups by score per MAC", metavar="FRACTION")
    params: Optional[float] = _f(None, "--structure group (bip, omp, imp, hydra): keep at most this fraction of the "
                                       "dense model's parameters instead of --sparsity, channels ranked across all "
                                       "groups by score per parameter", metavar="FRACTION")
    structure: Optional[str] = _f(None, "global, layer, filter, channel, nm or group (default per method); filter "
                                        "and channel keep the layer producing the model's output (the "
                                        "classifier) dense unless --include selects it")
    include: Optional[str] = _f(None, "prune only these layers: module names or glob patterns, comma-separated "
                                      "(e.g. 'layer*,fc'; default: every conv / linear layer)",
                                metavar="PATTERN")
    exclude: Optional[str] = _f(None, "leave these layers dense: module names or glob patterns, comma-separated",
                                metavar="PATTERN")
    variant: str = _f("paper", "BiP variant: paper or official (the authors' effective update)")
    schedule: str = _f("alternating", "BiP schedule: alternating (2 passes) or fused (1 pass)")
    score_lr: Optional[float] = _f(None, "upper-level (score) learning rate (default: Hydra 0.1; BiP 0.1 x 39100 / "
                                         "its steps, the paper's score lr x steps at any schedule length)")
    score_weight_decay: Optional[float] = _f(None, "score weight decay (default: BiP 0, Hydra 5e-4)")
    gamma: float = _f(1.0, "BiP gamma: the implicit-gradient term is scaled by 1/gamma")
    lr2: float = _f(1e-4, "official BiP variant: implicit-gradient coefficient")
    score_init: str = _f("magnitude", "BiP score init: magnitude or hydra")
    bn_correction: bool = _f(False, "BiP (paper variant): scale a pruned filter's score gradient by sqrt(eps / (var + "
                                    "eps)) of its switched-on output where a BatchNorm reads it (undoes BatchNorm's "
                                    "1/sqrt(eps) on the zero channel; docs/results.md)")
    unit_scores: bool = _f(False, "BiP (paper variant, --structure filter or channel): one shared score per filter "
                                  "(channel), moved by the mean of its weights' score gradients")
    mask_freeze: float = _f(0.0, "BiP (paper variant): keep the mask fixed for this last fraction of the schedule, "
                                 "training the weights only (0: the mask moves at every step)", metavar="FRACTION")
    imp_rate: float = _f(0.2, "IMP: fraction of remaining weights pruned per round; the last round prunes less "
                              "so that the run lands exactly on --sparsity")
    rounds: Optional[int] = _f(None, "IMP: run the fixed series instead, this many rounds of --imp-rate each "
                                     "(the paper's; ends at sparsity 1 - (1 - imp_rate)^rounds, which becomes "
                                     "--sparsity)")
    rewind_epoch: Optional[int] = _f(None, "IMP: epoch of the dense run whose starting weights every round rewinds "
                                           "to (default 3). pretrain keeps them in rewind.pt; prune --method imp "
                                           "--pretrained RUN rewinds to RUN's rewind.pt (this flag, if given, "
                                           "must name its epoch)")
    rewind_to_pretrained: bool = _f(False, "IMP with --pretrained: rewind every round to the pretrained (converged) "
                                           "weights themselves instead of an early epoch's (for a model.pt "
                                           "without rewind.pt)")
    hydra_score_epochs: int = _f(20, "Hydra: epochs of the score phase (then --epochs of finetuning)")
    pretrain_epochs: Optional[int] = _f(None, "prune without --pretrained: epochs of the dense phase run first "
                                              "(default: the dataset's dense schedule: cifar10/cifar100 160, "
                                              "tiny-imagenet 200, imagenet 90)")
    score_samples: Optional[int] = _f(None, "SNIP/GraSP: training images the scores see (default: SNIP one "
                                            "batch of --batch-size, GraSP 10 per class)")
    grasp_temperature: float = _f(200.0, "GraSP: temperature dividing the logits of the score passes")
    synflow_rounds: int = _f(100, "SynFlow: pruning rounds of the exponential schedule")
    gmp_ramp_epochs: Optional[int] = _f(None, "GMP: epochs of the cubic pruning ramp (default: half of --epochs)")
    gmp_every: int = _f(100, "GMP: steps between mask updates on the ramp")
    nm_n: int = _f(2, "N of N:M structure")
    nm_m: int = _f(4, "M of N:M structure")


@dataclass
class TrainHparams:
    epochs: Optional[int] = _f(None, "training epochs of the stage (default per method; pretrain: the dataset's "
                                     "dense schedule, cifar10/cifar100 160, tiny-imagenet 200, imagenet 90)")
    lr: Optional[float] = _f(None, "base (weight) learning rate, cosine-annealed (default per method)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: Optional[float] = _f(None, "weight decay (default per method)")
    seed: int = _f(0, "seed of model init, data order and subset choice")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    bf16: bool = _f(False, "bf16 autocast for forward/backward")
    compile: bool = _f(False, "torch.compile the model's forward")
    sync_bn: bool = _f(False, "DDP on GPUs: SyncBatchNorm (batch statistics over the global batch)")
    log_interval: int = _f(50, "steps between device->host metric syncs (progress bar)")
    progress: bool = _f(True, "tqdm progress bars (shown on a terminal only)")
    tensorboard: bool = _f(False, "also write every value of metrics.jsonl as TensorBoard events into "
                                  "OUT/tensorboard/ (needs the tensorboard package; a resume keeps logging)")
    nonfinite_skips: int = _f(0, "steps with a NaN/inf loss or gradient to skip (no update) before the run stops "
                                 "(per session: --resume takes the value given with it)")


BUDGET_METHODS = ("bip", "omp", "imp", "hydra")


def check_budget_flags(command: str, p: PruneHparams) -> None:
    """``--macs`` / ``--params``: one of them, a fraction in (0, 1], for prune --structure group with
    a method that projects scores (bip, omp, imp, hydra); IMP then lands on it (no --rounds)."""
    given = [(k, v) for k, v in (("macs", p.macs), ("params", p.params)) if v is not None]
    if not given:
        return
    if len(given) > 1:
        raise ValueError(f"macs: give one budget, --macs or --params, got --macs {p.macs} --params {p.params}")
    name, v = given[0]
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise ValueError(f"{name}: expected the kept fraction of the dense model's {name}, in (0, 1], got {v!r}")
    if command != "prune" or p.method not in BUDGET_METHODS or p.structure != "group":
        raise ValueError(f"{name}: a budget chooses whole channels: prune --method {'/'.join(BUDGET_METHODS)} "
                         f"--structure group, got {command} --method {p.method} --structure {p.structure}")
    if p.rounds is not None:
        raise ValueError(f"rounds: --{name} lands IMP on the budget (rounds_for({v:g}, --imp-rate)); drop --rounds")


SECTIONS = (("data", DataHparams), ("model", ModelHparams), ("prune", PruneHparams), ("train", TrainHparams))
FIELD_SECTION: Dict[str, str] = {}
for _sec, _cls in SECTIONS:
    for _fl in fields(_cls):
        assert _fl.name not in FIELD_SECTION, f"duplicate hparam name {_fl.name}"
        FIELD_SECTION[_fl.name] = _sec
