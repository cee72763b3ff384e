"""Backend selection for the functional ops.

Order (STYLE.md): the ``backend=`` argument, then the innermost :func:`use_backend` context, then
the ``BIP_FAST_BACKEND`` environment variable, then a default order per device:
CUDA tensors ``cuda -> triton -> reference``; CPU tensors ``cpu -> reference``.
An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` with the
reason. Capability probes are cached and never touch CUDA at import time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, List, Optional, Tuple, Union

import torch

from .. import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Dtypes the compiled and Triton kernels accept; float64 runs on the reference only.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why."""


def _device_type(device: Union[str, torch.device, None]) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


@functools.lru_cache(maxsize=None)
def _triton_status(device_type: str) -> Tuple[bool, str]:
    # Triton is an optional dependency, and importing it costs seconds: only when asked about.
    from . import triton as _tr

    ok, reason = _tr.available()
    if not ok:
        return False, reason
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return False, f"Triton kernels do not support device type {device_type!r}"
    return True, ""


def backend_status(name: str, device: Union[str, torch.device, None]) -> Tuple[bool, str]:
    """(usable, reason) for backend ``name`` on ``device``."""
    dev = _device_type(device)
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return True, ""
    if name == "cpu":
        if dev != "cpu":
            return False, f"the 'cpu' backend runs on CPU tensors, got device type {dev!r}"
        if not _ext.cpu_available():
            return False, "C++ CPU kernels not loadable: " + _ext.build_info()["reasons"].get("cpu", "")
        return True, ""
    if name == "cuda":
        if dev != "cuda":
            return False, f"the 'cuda' backend runs on CUDA tensors, got device type {dev!r}"
        if not _ext.cuda_ext_available():
            return False, "CUDA kernels not loadable: " + _ext.build_info()["reasons"].get("cuda", "")
        return True, ""
    return _triton_status(dev)


def available_backends(device: Union[str, torch.device, None] = "cpu") -> List[str]:
    """The backends usable for tensors on ``device``, in default preference order."""
    dev = _device_type(device)
    order = ("cuda", "triton", "reference") if dev == "cuda" else ("cpu", "triton", "reference")
    return [b for b in order if backend_status(b, dev)[0]]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``None`` restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: expected one of {BACKENDS} or None, got {name!r}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _requested(backend: Optional[str]) -> Tuple[Optional[str], str]:
    if backend is not None:
        return backend, "backend= argument"
    stack = getattr(_state, "stack", None)
    if stack and stack[-1] is not None:
        return stack[-1], "use_backend()"
    env = os.environ.get("BIP_FAST_BACKEND")
    if env:
        return env, "BIP_FAST_BACKEND"
    return None, ""


def resolve_backend(
    op: str,
    device: Union[str, torch.device],
    backend: Optional[str] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    supported: Tuple[str, ...] = BACKENDS,
) -> str:
    """Pick the backend for one call of ``op`` on tensors of ``device`` (and ``dtype``)."""
    name, source = _requested(backend)
    dev = _device_type(device)
    kernel_dtype = dtype is None or dtype in KERNEL_DTYPES
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"backend ({source}): expected one of {BACKENDS}, got {name!r}")
        if name not in supported:
            raise BackendUnavailableError(f"{op}: backend {name!r} does not implement this op")
        ok, reason = backend_status(name, dev)
        if not ok:
            raise BackendUnavailableError(f"{op}: backend {name!r} ({source}) unavailable: {reason}")
        if name != "reference" and not kernel_dtype:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} supports {[str(d) for d in KERNEL_DTYPES]}, got {dtype}; "
                "use backend='reference'"
            )
        return name
    if not kernel_dtype:
        return "reference"
    order = ("cuda", "triton", "reference") if dev == "cuda" else ("cpu", "reference")
    for cand in order:
        if cand in supported and backend_status(cand, dev)[0]:
            return cand
    return "reference"
