"""Hyper-parameters as dataclasses that become command-line flags (open_lth style).

A run is described by one :class:`RunConfig`: four sections (:class:`DataHparams`,
:class:`ModelHparams`, :class:`PruneHparams`, :class:`TrainHparams`) plus the run-level fields
(command, output folder, resume/force, input checkpoint). Every section field becomes a flag
``--field-name`` (field names are unique across sections), so

    defaults  <  method defaults (``METHOD_DEFAULTS``)  <  ``--config FILE.yaml``  <  flags

is the precedence order. Fields left at ``None`` whose meaning depends on the method (``epochs``,
``lr``, ``weight_decay``, ``structure``) are filled from ``METHOD_DEFAULTS`` by
:meth:`RunConfig.resolved`; the resolved config is what a run records in its checkpoint.

The sections, their defaults and the paper settings behind them are in :mod:`.sections`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from ..models import ARCHS
from .sections import (
    CIFAR_DATASETS, COMMANDS, DATASETS, FIELD_SECTION, FOLDER_DATASETS, METHOD_DEFAULTS, METHODS, SCHEDULES,
    SCORE_INITS, SECTIONS, STRUCTURES, VARIANTS, DataHparams, ModelHparams, PruneHparams, TrainHparams,
    check_budget_flags, dense_epochs,
)

__all__ = [
    "METHODS", "COMMANDS", "STRUCTURES", "VARIANTS", "SCHEDULES", "SCORE_INITS", "DATASETS",
    "METHOD_DEFAULTS", "DataHparams", "ModelHparams", "PruneHparams", "TrainHparams", "RunConfig",
    "add_flags", "load_yaml", "layer_patterns", "fixed_series_sparsity",
]


_RUN_FIELDS = ("command", "out", "resume", "force", "checkpoint")


def _base_type(tp):
    """(python type, is_optional, is_tuple) of a field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, dict(vars(typing)), {})  # annotations are strings (from __future__)
    origin = typing.get_origin(tp)
    optional = False
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = True
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, Tuple):
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def _coerce(name: str, value, tp, optional: bool, is_tuple: bool):
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: must not be empty (null)")
    if is_tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{name}: expected two values, got {value!r}")
        return tuple(_coerce(name, v, tp, False, False) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                                           or isinstance(value, str)):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return os.fspath(value)
    return value


def _section_from_dict(cls, d: Dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in known:
            raise ValueError(f"{where}: unknown hyper-parameter {k!r}; valid: {', '.join(known)}")
        tp, opt, tup = _base_type(known[k].type)
        kwargs[k] = _coerce(k, v, tp, opt, tup)
    return cls(**kwargs)


def load_yaml(path) -> Dict[str, Any]:
    """Read a YAML config (nested sections or flat keys) into a flat {field: value} dict."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: file '{path}' does not exist")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise ValueError(f"--config: '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"--config: '{path}' must hold a mapping, got {type(raw).__name__}")
    return flatten(raw, where=f"--config {path}")


def flatten(d: Dict[str, Any], where: str = "config") -> Dict[str, Any]:
    """Nested ``{section: {field: v}}`` and/or flat ``{field: v}`` -> flat dict (dashes allowed)."""
    flat: Dict[str, Any] = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key in dict(SECTIONS):
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ValueError(f"{where}: section {key!r} must be a mapping, got {type(v).__name__}")
            for k2, v2 in v.items():
                k2 = str(k2).replace("-", "_")
                if FIELD_SECTION.get(k2) != key:
                    raise ValueError(f"{where}: unknown hyper-parameter {key}.{k2}")
                flat[k2] = v2
        elif key in FIELD_SECTION or key in _RUN_FIELDS:
            flat[key] = v
        else:
            raise ValueError(f"{where}: unknown hyper-parameter {k!r}")
    return flat


@dataclass
class RunConfig:
    """Everything a run needs. ``command`` in COMMANDS; ``out`` the run folder; ``checkpoint``
    the input of finetune/eval/export; ``resume``/``force`` the output-folder policy."""

    command: str = "prune"
    out: Optional[str] = None
    resume: bool = False
    force: bool = False
    checkpoint: Optional[str] = None
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    prune: PruneHparams = field(default_factory=PruneHparams)
    train: TrainHparams = field(default_factory=TrainHparams)

    # -- dict / yaml ----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in _RUN_FIELDS}
        for sec, _ in SECTIONS:
            sd = dataclasses.asdict(getattr(self, sec))
            if sd.get("subset") is not None:
                sd["subset"] = list(sd["subset"])
            d[sec] = sd
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        flat = flatten(d)
        return cls.from_flat(flat)

    @classmethod
    def from_flat(cls, flat: Dict[str, Any]) -> "RunConfig":
        per = {sec: {} for sec, _ in SECTIONS}
        run = {}
        for k, v in flat.items():
            if k in _RUN_FIELDS:
                run[k] = v
            elif k in FIELD_SECTION:
                per[FIELD_SECTION[k]][k] = v
            else:
                raise ValueError(f"config: unknown hyper-parameter {k!r}")
        for k in ("resume", "force"):
            if k in run:
                run[k] = _coerce(k, run[k], bool, False, False)
        for k in ("command", "out", "checkpoint"):
            if k in run and run[k] is not None:
                run[k] = _coerce(k, run[k], str, True, False)
        secs = {sec: _section_from_dict(c, per[sec], sec) for sec, c in SECTIONS}
        return cls(**run, **secs)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path) -> "RunConfig":
        return cls.from_flat(load_yaml(path))

    def flat(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in _RUN_FIELDS}
        for sec, _ in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, sec)))
        return out

    def replace(self, **changes) -> "RunConfig":
        """A copy with flat field changes (``cfg.replace(lr=0.05, epochs=2)``)."""
        flat = self.flat()
        for k in changes:
            if k not in flat:
                raise ValueError(f"replace: unknown hyper-parameter {k!r}")
        flat.update(changes)
        return RunConfig.from_flat(flat)

    # -- defaults + validation --------------------------------------------------------------
    def resolved(self) -> "RunConfig":
        """Fill the per-method defaults (None fields) and validate; returns a new config."""
        method = self.prune.method
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        md = dict(METHOD_DEFAULTS[method])
        if method == "dense":  # pretrain / finetune: the dataset's dense schedule
            md["epochs"] = dense_epochs(self.data.dataset)
        flat = self.flat()
        for k, v in md.items():
            if flat[k] is None:
                flat[k] = v
        if flat["score_weight_decay"] is None:
            flat["score_weight_decay"] = 5e-4 if method == "hydra" else 0.0
        if flat["score_lr"] is None and method == "hydra":
            flat["score_lr"] = 0.1  # Hydra's; BiP resolves None from its step count (scaled_score_lr)
        if flat["rewind_epoch"] is None:
            flat["rewind_epoch"] = _default_rewind_epoch(self.command, method, flat)
        if method == "imp" and isinstance(flat["rounds"], int) and flat["rounds"] >= 1 and 0 < flat["imp_rate"] < 1:
            flat["sparsity"] = fixed_series_sparsity(flat["imp_rate"], flat["rounds"])  # where the series ends
        cfg = RunConfig.from_flat(flat)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        c, d, m, p, t = self.command, self.data, self.model, self.prune, self.train
        if c not in COMMANDS:
            raise ValueError(f"command: expected one of {', '.join(COMMANDS)}, got {c!r}")
        if d.dataset.lower() not in FOLDER_DATASETS and d.dataset.lower().replace("-", "") not in CIFAR_DATASETS:
            raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {d.dataset!r}")
        if d.dataset.lower() in FOLDER_DATASETS and d.subset is not None:
            raise ValueError(f"subset: CIFAR only; {d.dataset} reads the whole folder (pass a smaller folder)")
        if isinstance(d.workers, bool) or not isinstance(d.workers, int) or d.workers < 0:
            raise ValueError(f"workers: expected an integer >= 0, got {d.workers!r}")
        arch = m.arch.lower()
        if arch not in ARCHS and not arch.startswith("tv_"):
            raise ValueError(f"arch: expected one of {', '.join(ARCHS)} or tv_<torchvision model>, got {m.arch!r}")
        if p.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {p.method!r}")
        if not (isinstance(p.sparsity, float) and math.isfinite(p.sparsity) and 0.0 <= p.sparsity < 1.0):
            raise ValueError(f"sparsity: expected a value in [0, 1), got {p.sparsity!r}")
        if p.structure is not None and p.structure not in STRUCTURES:
            raise ValueError(f"structure: expected one of {', '.join(STRUCTURES)}, got {p.structure!r}")
        if p.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {p.variant!r}")
        if p.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {p.schedule!r}")
        if p.score_init not in SCORE_INITS:
            raise ValueError(f"score_init: expected one of {', '.join(SCORE_INITS)}, got {p.score_init!r}")
        if p.variant == "official" and p.schedule != "alternating":
            raise ValueError("schedule: the official BiP variant is alternating only")
        if not 0.0 < p.imp_rate < 1.0:
            raise ValueError(f"imp_rate: expected a value in (0, 1), got {p.imp_rate!r}")
        if p.rounds is not None and (p.rounds < 1 or p.method != "imp" or c != "prune"):
            raise ValueError(f"rounds: prune --method imp runs --rounds N >= 1 rounds of --imp-rate (the fixed "
                             f"series), got --rounds {p.rounds} with {c} --method {p.method}")
        for name, v in (("include", p.include), ("exclude", p.exclude)):
            if v is not None and c != "prune":
                raise ValueError(f"{name}: only prune chooses the layers to mask ({c} takes them from its model), "
                                 f"got --{name} {v!r}")
            if v is not None and not layer_patterns(v):
                raise ValueError(f"{name}: expected module names or glob patterns, comma-separated, got {v!r}")
        if not (p.gamma > 0):
            raise ValueError(f"gamma: expected a positive value, got {p.gamma!r}")
        for name, v in (("rewind_epoch", p.rewind_epoch), ("hydra_score_epochs", p.hydra_score_epochs)):
            if v is not None and v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        imp_pre = c == "prune" and p.method == "imp" and bool(m.pretrained)
        if p.rewind_to_pretrained and not imp_pre:
            raise ValueError("rewind_to_pretrained: only prune --method imp --pretrained rewinds to the pretrained "
                             "weights")
        if p.rewind_to_pretrained and p.rewind_epoch is not None:
            raise ValueError(f"rewind_epoch: --rewind-to-pretrained rewinds to the pretrained weights, not to an "
                             f"epoch; drop one of them, got --rewind-epoch {p.rewind_epoch}")
        if c == "pretrain" and p.rewind_epoch is not None and t.epochs is not None and p.rewind_epoch >= t.epochs:
            raise ValueError(f"rewind_epoch: pretrain keeps the weights of the start of that epoch for IMP, so it "
                             f"must be < epochs ({t.epochs}), got {p.rewind_epoch}")
        if p.pretrain_epochs is not None and p.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs: expected an integer >= 1, got {p.pretrain_epochs!r}")
        if not (isinstance(p.nm_n, int) and isinstance(p.nm_m, int) and 0 < p.nm_n <= p.nm_m):
            raise ValueError(f"nm_n: expected 0 < nm_n <= nm_m, got {p.nm_n}:{p.nm_m}")
        for name, v in (("score_samples", p.score_samples), ("synflow_rounds", p.synflow_rounds),
                        ("gmp_ramp_epochs", p.gmp_ramp_epochs), ("gmp_every", p.gmp_every)):
            if v is not None and v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if not (math.isfinite(p.grasp_temperature) and p.grasp_temperature > 0):
            raise ValueError(f"grasp_temperature: expected a positive number, got {p.grasp_temperature!r}")
        check_budget_flags(c, p)
        if p.method == "imp" and p.structure not in (None, "global", "filter", "group"):
            raise ValueError(f"structure: imp prunes globally (global), whole filters per layer (filter, IMP-F) or "
                             f"whole channel groups (group), got {p.structure!r}")
        if p.method in ("snip", "grasp", "synflow", "gmp") and p.structure not in (None, "global", "layer"):
            raise ValueError(f"structure: {p.method} prunes globally or layer-wise, got {p.structure!r}")
        if t.epochs is not None and t.epochs < 1:
            raise ValueError(f"epochs: expected an integer >= 1, got {t.epochs!r}")
        for name, v in (("lr", t.lr), ("score_lr", p.score_lr)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        for name, v in (("momentum", t.momentum), ("weight_decay", t.weight_decay),
                        ("score_weight_decay", p.score_weight_decay), ("lr2", p.lr2)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
        if not (math.isfinite(p.mask_freeze) and 0.0 <= p.mask_freeze < 1.0):
            raise ValueError(f"mask_freeze: expected a fraction in [0, 1), got {p.mask_freeze!r}")
        for name in ("bn_correction", "unit_scores", "mask_freeze"):  # options of the paper variant of BiP only
            if getattr(p, name) and (p.method != "bip" or p.variant != "paper"):
                raise ValueError(f"{name}: applies to --method bip with --variant paper, got --method {p.method} "
                                 f"--variant {p.variant}")
        if p.unit_scores and p.structure not in ("filter", "channel"):
            raise ValueError(f"unit_scores: shares one score per filter or channel (--structure filter or channel), "
                             f"got --structure {p.structure}")
        for name, v in (("batch_size", d.batch_size), ("test_batch_size", d.test_batch_size),
                        ("log_interval", t.log_interval)):
            if v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        for name, v in (("seed", t.seed), ("nonfinite_skips", t.nonfinite_skips)):
            if v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        if c == "prune" and p.structure == "nm" and abs((1.0 - p.sparsity) - p.nm_n / p.nm_m) > 1e-9:
            raise ValueError(f"sparsity: {p.nm_n}:{p.nm_m} pruning removes {1 - p.nm_n / p.nm_m:g} of the weights; "
                             f"pass --sparsity {1 - p.nm_n / p.nm_m:g}, got {p.sparsity!r}")
        if d.subset is not None and (d.subset[0] < 1 or d.subset[1] < 1):
            raise ValueError(f"subset: expected two positive integers N_TRAIN N_TEST, got {list(d.subset)}")
        dev = t.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
        if c == "pretrain" and p.method != "dense":
            raise ValueError(f"method: pretrain trains the dense model (method dense), got {p.method!r}")
        if c == "prune" and p.method == "dense":
            raise ValueError("method: prune needs a pruning method (not dense), got 'dense' "
                             "(use the pretrain command)")
        if c == "prune" and p.sparsity <= 0.0:
            raise ValueError(f"sparsity: prune needs a sparsity in (0, 1), got {p.sparsity!r}")
        if c in ("finetune", "eval", "export") and not self.checkpoint:
            raise ValueError(f"checkpoint: {c} needs --checkpoint PATH (a run folder, checkpoint.pt or model.pt)")


def layer_patterns(value: Optional[str]) -> Optional[list]:
    """``--include`` / ``--exclude``: the comma-separated module names or glob patterns as a list
    (None: not given)."""
    if value is None:
        return None
    return [x.strip() for x in str(value).split(",") if x.strip()]


def fixed_series_sparsity(rate: float, rounds: int) -> float:
    """Sparsity after ``rounds`` IMP rounds of ``rate`` each: 1 - (1 - rate)^rounds."""
    return 1.0 - (1.0 - rate) ** rounds


DEFAULT_REWIND_EPOCH = 3  # "an early epoch" of the dense run (SPEC §5); our choice


def _default_rewind_epoch(command: str, method: str, flat: Dict[str, Any]) -> Optional[int]:
    """rewind_epoch left unset: 3, except where the run decides it (IMP from --pretrained: the
    pretrained run's rewind.pt; --rewind-to-pretrained: none) or cannot reach it (a pretrain run
    of at most 3 epochs keeps no rewind weights). None is a fixed point, so resolving twice is safe."""
    if command == "prune" and method == "imp" and flat.get("pretrained"):
        return None
    if command == "pretrain" and flat.get("epochs") is not None and flat["epochs"] <= DEFAULT_REWIND_EPOCH:
        return None
    return DEFAULT_REWIND_EPOCH


# --------------------------------------------------------------------------------------------
# argparse
# --------------------------------------------------------------------------------------------

def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per hyper-parameter field. Flags default to "not given" (SUPPRESS), so that
    only explicitly passed flags override the config file."""
    for sec, cls in SECTIONS:
        group = parser.add_argument_group(f"{sec} hyper-parameters")
        for fl in fields(cls):
            tp, optional, is_tuple = _base_type(fl.type)
            flag = "--" + fl.name.replace("_", "-")
            meta = dict(fl.metadata)
            helptext = meta.pop("help", "")
            default = fl.default
            if default is not dataclasses.MISSING and default is not None:
                helptext += f" (default: {default})"
            kw: Dict[str, Any] = {"dest": fl.name, "default": argparse.SUPPRESS, "help": helptext}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = tp
                kw.update(meta)
                if "metavar" not in kw:
                    kw["metavar"] = fl.name.upper()
            group.add_argument(flag, **kw)
