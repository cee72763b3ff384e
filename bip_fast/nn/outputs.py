"""The layers that produce a model's output, found by tracing its forward with torch.fx.

A per-row mask structure applied to such a layer removes whole outputs: filter pruning of a
classifier removes classes that can then never be predicted. The pruning algorithms keep these
layers dense under the filter and channel structures (:mod:`bip_fast.pruning.base`, SPEC §2).

The trace is symbolic (no example input, nothing runs): conv / linear / attention layers, plain or
masked, and the masked norm layers are leaves; from the graph's output node the walk goes back
through every other operation (flatten, pooling, activations, norms, getitem, additions) and stops
at the first conv / linear / attention layer on each path. Whatever the order in which the model
registers its layers, the layers found are those whose output becomes the model's output, so a
model returning several heads (a tuple or dict) gives one layer per head. A forward that torch.fx
cannot trace (control flow on tensor values) raises ValueError naming the reason.
"""

from __future__ import annotations

from typing import Dict, List

import torch.fx as fx
from torch import nn

from .modules import MASKED_OF, MASKED_TYPES
from .norm import MASKED_NORM_TYPES

__all__ = ["output_layers", "norms_after"]

# layers whose output rows are weights of their own: where the walk back from the output stops
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention)
_LEAVES = _WEIGHTED + MASKED_TYPES + MASKED_NORM_TYPES + tuple(MASKED_OF)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every conv / linear / attention layer (plain, masked or subclassed)
    and the masked norms as leaves: their own forwards call the masking ops, which need not trace."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as e:  # any error of symbolic tracing through arbitrary user code
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"model: torch.fx cannot trace {type(model).__name__}.forward "
                         f"({type(e).__name__}: {detail})") from None


def norms_after(model: nn.Module) -> Dict[str, str]:
    """{conv layer: the BatchNorm that alone reads its output} for every conv layer of ``model``
    (plain or masked) whose output goes to one BatchNorm and nowhere else, by the same trace as
    :func:`output_layers`. Raises ValueError when torch.fx cannot trace the forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    graph = _trace(model)
    modules = dict(model.named_modules())
    out: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.conv._ConvNd):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and \
                isinstance(modules.get(users[0].target), nn.modules.batchnorm._BatchNorm):
            out[node.target] = users[0].target
    return out


def output_layers(model: nn.Module) -> List[str]:
    """Names (registration order) of the conv / linear / attention layers of ``model`` whose output
    reaches the model's output through no other such layer: a classifier's name, ``[""]`` when
    ``model`` is itself such a layer. Raises ValueError when torch.fx cannot trace the forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, _WEIGHTED):
        return [""]
    graph = _trace(model)
    modules = dict(model.named_modules())
    found, seen = set(), set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "call_module" and isinstance(modules.get(arg.target), _WEIGHTED):
                found.add(arg.target)
            else:
                stack.append(arg)
    return [n for n in modules if n in found]
