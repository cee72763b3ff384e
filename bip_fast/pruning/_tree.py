"""Nested batches and model outputs: the tensors inside any structure of dicts, lists and tuples.

With ``compute_loss`` an algorithm passes the user's batch through untouched, so all it needs of a
structure is to find its tensors (the batch check) and, for GraSP's temperature, to rescale the
floating-point tensors of a model output while keeping its shape (dict, namedtuple, list, tuple).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch

__all__ = ["tensor_leaves", "map_floating"]


def tensor_leaves(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or dicts / lists / tuples of them, any nesting), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensor_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensor_leaves(v)


def map_floating(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every floating-point tensor in it; same container types."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        new = copy.copy(obj)  # keeps a dict subclass (OrderedDict, a model-output class)
        for k, v in obj.items():
            new[k] = map_floating(v, fn)
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_floating(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_floating(v, fn) for v in obj)
    return obj
