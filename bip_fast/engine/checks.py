"""Checks of a run against its folder and its model, made before the folder is touched.

Run consistency. A run folder's ``config.yaml`` and ``checkpoint.pt`` both record the run's
configuration; :func:`check_same_run` refuses files whose records disagree on what defines the
run (command, arch, dataset, method, structure, sparsity), so a checkpoint copied in from another
run can neither be resumed nor evaluated under the wrong name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional


from ..nn import MASKED_OF, MASKED_TYPES, layer_selection
from ..nn.convert import _bypassed
from .hparams import RunConfig, layer_patterns

__all__ = ["RUN_IDENTITY", "check_same_run", "check_nm_layers"]

# (section, field) pairs that define what a run is; everything else may legitimately differ.
RUN_IDENTITY = (("model", "arch"), ("data", "dataset"), ("prune", "method"), ("prune", "structure"),
                ("prune", "sparsity"), ("prune", "macs"), ("prune", "params"))


def _norm(section: str, key: str, value):
    if value is None:
        return None
    if key == "dataset":
        return str(value).lower().replace("-", "")
    if key == "arch":
        return str(value).lower()
    return value


def check_same_run(stored: Mapping[str, Any], folder, what: str, file) -> None:
    """Refuse when ``stored`` (a checkpoint's config dict) and ``folder/config.yaml`` describe
    different runs. A folder without config.yaml, or an unreadable one, is not checked here."""
    yaml_path = Path(folder) / "config.yaml"
    if not yaml_path.is_file() or not isinstance(stored, Mapping):
        return
    try:
        recorded: Dict[str, Any] = RunConfig.from_yaml(yaml_path).to_dict()
    except (ValueError, FileNotFoundError, OSError):
        return
    keys = [("", "command")] + list(RUN_IDENTITY)
    for sec, key in keys:
        a = stored.get(key) if not sec else (stored.get(sec) or {}).get(key)
        b = recorded.get(key) if not sec else (recorded.get(sec) or {}).get(key)
        if sec == "prune" and key == "structure" and (a is None or b is None):
            continue  # an unresolved config leaves it to the method default
        if _norm(sec, key, a) != _norm(sec, key, b):
            raise ValueError(f"{what}: '{file}' records {key}={a!r} but '{yaml_path}' records {key}={b!r}; "
                             f"the files do not belong to one run")


# --------------------------------------------------------------------------------------------
# checks that need the model, run before the folder is touched
# --------------------------------------------------------------------------------------------

def check_nm_layers(model, n: int, m: int, include: Optional[str] = None, exclude: Optional[str] = None) -> None:
    """N:M structure: every layer that will be masked (``--include`` / ``--exclude``, the
    comma-separated patterns) needs an input dimension divisible by M (a depthwise 3x3 conv has 9).
    Raises ValueError naming the first layer that has not."""
    chosen = set(layer_selection(model, layer_patterns(include), layer_patterns(exclude)))
    for name, mod in model.named_modules():
        if not (isinstance(mod, MASKED_TYPES) or type(mod) in MASKED_OF) or _bypassed(model, name):
            continue
        k = mod.weight[0].numel()
        if k % m and name in chosen:
            raise ValueError(f"structure: {n}:{m} pruning needs every pruned layer's input dimension to divide by "
                             f"{m}; layer {name!r} (weight {tuple(mod.weight.shape)}) has {k} (--exclude {name} "
                             f"leaves it dense)")
