"""Scores to masks for an :class:`~bip_fast.pruning.base.Algorithm`: which masked layers a structure
keeps dense, and the projection of the scores into the masks of the layers it prunes.

Under the filter and channel structures (``ROW_STRUCTURES``) the layers that produce the model's
output (:func:`bip_fast.nn.output_layers`, e.g. the classifier) stay dense unless ``include``
selects them (SPEC §2): :func:`_dense_outputs` finds them (the algorithm's ``dense_outputs``) and
:func:`_project_into` gives them all-True masks while it projects every other layer.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..masks import keep_count, project
from ..masks.budget import Budget
from ..masks.groups import apply_group_vectors, project_groups
from ..nn import layer_selection, masked_modules, output_layers
from ..nn.convert import BUDGET_ATTR

if TYPE_CHECKING:  # annotations only: base imports this module
    from .base import Algorithm

__all__ = ["ROW_STRUCTURES"]

# Structures whose unit is a whole row or column of a layer: on a layer that produces the model's
# output they would remove outputs (filter: a classifier's classes) or the same input features from
# every output (channel), so that layer is kept dense unless ``include`` selects it (SPEC §2).
ROW_STRUCTURES = ("filter", "channel")
_ROW_EFFECT = {"filter": "filter pruning would remove whole output rows (classes that could never be predicted)",
               "channel": "channel pruning would remove the same input features from every output"}


def _selects_the_masked(model: nn.Module, include, exclude) -> bool:
    """Whether ``include`` / ``exclude`` select exactly the layers of ``model`` that are masked (as
    the engine passes them with a model it sparsified with them)."""
    masked = {n for n, _ in masked_modules(model)}
    return [n for n in layer_selection(model) if n in masked] == layer_selection(model, include, exclude)


def _dense_outputs(model: nn.Module, module_names: Sequence[str], structure: Optional[str], include) -> List[int]:
    """Indices into ``module_names`` (the masked modules of ``model``) of the layers that ``structure``
    keeps dense (see :class:`~bip_fast.pruning.base.Algorithm`). Called from ``Algorithm.__init__``:
    the warnings' stacklevel points at the caller of the algorithm's constructor."""
    if structure not in ROW_STRUCTURES:
        return []
    try:
        outs = output_layers(model)
    except ValueError as e:
        warnings.warn(f"structure={structure!r}: cannot find the layers that produce the model's output "
                      f"({e}), so every masked layer is pruned, a classifier too; keep it dense with "
                      f"exclude=[its name]", UserWarning, stacklevel=4)
        return []
    asked = set(layer_selection(model, include)) if include is not None else set()
    keep = [o for o in outs if o not in asked]
    held = [i for i, n in enumerate(module_names) if any(n == o or n.startswith(o + ".") or o == ""
                                                         for o in keep)]
    if held:
        names = ", ".join(repr(module_names[i]) for i in held)
        it = "it produces" if len(held) == 1 else "they produce"
        warnings.warn(f"structure={structure!r}: keeping {names} dense: {it} the model's output and "
                      f"{_ROW_EFFECT[structure]}; the authors keep the classifier dense in structured modes "
                      f"(SPEC §2). To prune it, select it with include= (CLI: --include)",
                      UserWarning, stacklevel=4)
    return held


def _project_into(alg: Algorithm, scores: Sequence[torch.Tensor], density: float, structure: str,
                  n: int, m: int, hist1: Optional[torch.Tensor] = None, filter_norm: str = "l2",
                  within: Optional[Sequence[torch.Tensor]] = None, budget: Optional[Budget] = None) -> None:
    """Project ``scores`` (one per masked module) and copy the masks into the modules.

    ``hist1``: the first-digit histogram of exactly these scores, produced by the SGD launch
    that just updated them; global projection then skips its first pass. ``filter_norm`` and
    ``within`` (filter / channel / group structures): see :func:`bip_fast.masks.project`.
    ``budget`` (group structure; ``density`` is then unused): a MACs or parameter budget,
    :func:`bip_fast.masks.groups.project_groups`.
    """
    scores = [s.detach() for s in scores]
    if budget is None and getattr(alg.model, BUDGET_ATTR, None) is not None:  # sparsity_report's budget entry
        setattr(alg.model, BUDGET_ATTR, None)  # describes only masks a budget chose (setattr: also through a proxy)
    if structure == "global" and hist1 is not None:
        total = sum(s.numel() for s in scores)
        alg._set_masks(ops.topk_masks(scores, keep_count(total, density), hist1=hist1))
    elif structure == "group":  # whole channels of the groups of bip_fast.attach_groups
        masks, vectors = project_groups(alg.model, alg.module_names, scores, density, filter_norm=filter_norm,
                                        within=within, budget=budget)
        alg._set_masks(masks)
        apply_group_vectors(alg.model, vectors)
    else:
        held = set(alg.dense_outputs) if structure in ROW_STRUCTURES else set()
        idx = [i for i in range(len(alg.modules)) if i not in held]  # the layers this structure prunes
        try:
            part = project([scores[i] for i in idx], density, structure, n=n, m=m, filter_norm=filter_norm,
                           within=None if within is None else [within[i] for i in idx],
                           out_dims=[getattr(alg.modules[i], "out_dim", 0) for i in idx])
        except ValueError as e:  # name the layer, not its index in the list of scores
            raise ValueError(re.sub(r"scores\[(\d+)\]", lambda g: f"layer {alg.module_names[idx[int(g.group(1))]]!r}",
                                    str(e))) from None
        part = iter(part)  # and all-True masks for the layers kept dense (dense_outputs)
        alg._set_masks([torch.ones_like(mod.mask) if i in held else next(part) for i, mod in enumerate(alg.modules)])
