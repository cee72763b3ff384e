"""Triton backend of bip_fast.

Importing this package never imports triton: the kernels live in submodules that are imported
lazily, the first time an op is used (``register()``). ``available()`` probes once whether
triton can be imported and whether it can run here (a CUDA device, or the CPU interpreter
selected with ``TRITON_INTERPRET=1`` before triton was imported).

Ops registered by ``register()`` (all in the ``bip_fast`` namespace, via
``torch.library.triton_op`` so that torch.compile traces into the kernels):

    radix_histogram_triton(Tensor[] scores, int shift, int bits, int prefix, int prefix_shift) -> Tensor
    topk_masks_triton(Tensor[] scores, int keep) -> Tensor[]
    topk_masks_hist_triton(Tensor[] scores, int keep, Tensor hist1) -> Tensor[]
    masked_weight_triton(Tensor theta, Tensor mask) -> Tensor
    masked_weight_backward_triton(Tensor grad, Tensor theta, Tensor mask, Tensor scores,
                                  float ig_scale, bool need_theta, bool need_scores) -> (Tensor, Tensor)
    fused_sgd_triton_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, float lr,
                      float momentum, float weight_decay, Tensor(c!)? hist1,
                      Tensor? skip=None) -> ()
    masked_linear_fwd_triton(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor
    masked_linear_bwd_input_triton(Tensor grad, Tensor weight, Tensor mask) -> Tensor
    masked_linear_bwd_weight_triton(Tensor grad, Tensor x, Tensor weight, Tensor mask,
                                    Tensor scores, float ig_scale, bool need_theta,
                                    bool need_scores) -> (Tensor, Tensor)

The Python functions below call ``register()`` and then the registered op, so callers may use
either them or ``torch.ops.bip_fast.<name>`` (after ``register()``).
"""

from __future__ import annotations

import importlib
import os
import threading

import torch

__all__ = [
    "available",
    "register",
    "launch",
    "register_triton_op",
    "radix_histogram_triton",
    "topk_masks_triton",
    "topk_masks_hist_triton",
    "masked_weight_triton",
    "masked_weight_backward_triton",
    "fused_sgd_triton_",
    "masked_linear_triton",
]

_KERNEL_MODULES = ("topk", "masked_weight", "fused_sgd", "masked_linear")

_probe_result: tuple[bool, str] | None = None
_modules: dict = {}
_registered = False
_lock = threading.RLock()


def interpreter_enabled() -> bool:
    """True when the Triton CPU interpreter is selected (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def available() -> tuple[bool, str]:
    """Return ``(ok, reason)``: whether the Triton backend can run in this process.

    The probe imports triton (once, cached) but never initialises CUDA beyond
    ``torch.cuda.is_available()``. ``reason`` is empty when ``ok`` is True.
    """
    global _probe_result
    if _probe_result is not None:
        return _probe_result
    with _lock:
        if _probe_result is not None:
            return _probe_result
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            from torch.library import triton_op, wrap_triton  # noqa: F401
        except Exception as exc:  # any import failure means "unavailable", with the reason
            _probe_result = (False, f"triton cannot be imported: {type(exc).__name__}: {exc}")
            return _probe_result
        if interpreter_enabled():
            _probe_result = (True, "")
        elif torch.cuda.is_available():
            _probe_result = (True, "")
        else:
            _probe_result = (
                False,
                "triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
                "to run on CPU tensors",
            )
        return _probe_result


def _interpreted(kernel) -> bool:
    """Whether ``kernel`` (a @triton.jit function, possibly under @triton.autotune) was built
    for the CPU interpreter (triton decides this when the kernel is decorated)."""
    from triton.runtime.interpreter import InterpretedFunction

    k = kernel
    for _ in range(8):
        if isinstance(k, InterpretedFunction):
            return True
        if not hasattr(k, "fn"):
            return False
        k = k.fn
    return False


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a Triton kernel from inside a ``triton_op`` body.

    On a GPU this is ``wrap_triton(kernel)[grid](...)``, so that torch.compile / make_fx see
    the kernel. Under ``TRITON_INTERPRET=1`` the interpreter launches kernels eagerly and cannot
    take fake tensors, so with fake/meta tensors (the op's fake implementation, which only
    allocates outputs) the launch is skipped; ``register_triton_op`` keeps such ops opaque to
    functionalization there, so a compiled graph calls the real op instead of a decomposition.
    """
    if _interpreted(kernel):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(isinstance(t, FunctionalTensor) for t in tensors):
            raise RuntimeError(
                "bip_fast triton op traced through a functional decomposition under "
                "TRITON_INTERPRET=1; the interpreter cannot launch kernels on traced tensors"
            )
        if any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors):
            return
        kernel[grid](*args, **kwargs)
        return
    from torch.library import wrap_triton

    wrap_triton(kernel)[grid](*args, **kwargs)


def register_triton_op(name: str, fn, mutates_args=()):
    """``torch.library.triton_op(name, mutates_args=...)(fn)``; under the CPU interpreter the
    op is additionally kept opaque to functionalization (see ``launch``)."""
    from torch.library import triton_op

    op = triton_op(name, mutates_args=mutates_args)(fn)
    if interpreter_enabled():
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        def _opaque(mode, op_, types, args, kwargs):
            return mode.__torch_dispatch__(op_, types, args, kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, _opaque)
    return op


def register() -> None:
    """Import the kernel modules and register every Triton op (idempotent).

    Raises RuntimeError with the probe's reason when Triton is unavailable.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        ok, reason = available()
        if not ok:
            raise RuntimeError(f"bip_fast triton backend unavailable: {reason}")
        for name in _KERNEL_MODULES:
            mod = importlib.import_module(f"{__name__}.{name}")
            mod.register()
            _modules[name] = mod
        _registered = True


def _module(name: str):
    register()
    return _modules[name]


def radix_histogram_triton(scores, shift: int, bits: int, prefix: int, prefix_shift: int):
    """int64[4096] histogram of digit ``(key >> shift) & ((1 << bits) - 1)`` over the elements
    with ``(key >> prefix_shift) == prefix`` (``prefix_shift >= 31``: all elements)."""
    register()
    return torch.ops.bip_fast.radix_histogram_triton(list(scores), shift, bits, prefix, prefix_shift)


def topk_masks_triton(scores, keep: int):
    """Bool masks with exactly ``keep`` True over all tensors (largest |s|, ties -> earlier)."""
    register()
    return torch.ops.bip_fast.topk_masks_triton(list(scores), int(keep))


def topk_masks_hist_triton(scores, keep: int, hist1):
    """``topk_masks_triton`` with the D1 histogram ``hist1`` (int64[4096]) already computed."""
    register()
    return torch.ops.bip_fast.topk_masks_hist_triton(list(scores), int(keep), hist1)


def masked_weight_triton(theta, mask):
    """``theta * mask`` in theta's dtype."""
    register()
    return torch.ops.bip_fast.masked_weight_triton(theta, mask)


def masked_weight_backward_triton(grad, theta, mask, scores, ig_scale: float,
                                  need_theta: bool = True, need_scores: bool = True):
    """``(mask*grad, sgn(scores)*(theta*grad - ig_scale*mask*grad^2))``; empty when not needed."""
    register()
    return torch.ops.bip_fast.masked_weight_backward_triton(
        grad, theta, mask, scores, float(ig_scale), bool(need_theta), bool(need_scores)
    )


def fused_sgd_triton_(params, grads, bufs, lr: float, momentum: float, weight_decay: float,
                      hist1=None, skip=None) -> None:
    """In-place SGD step (momentum, weight decay); optional D1 histogram of updated params;
    a true ``skip`` (one bool on the device) leaves everything unchanged."""
    register()
    torch.ops.bip_fast.fused_sgd_triton_(
        list(params), list(grads), list(bufs), float(lr), float(momentum), float(weight_decay), hist1, skip
    )


def masked_linear_triton(x, weight, mask, scores, bias, ig_scale: float):
    """``x @ (mask*weight)^T + bias`` with the BiP backward (see masked_linear.py)."""
    return _module("masked_linear").masked_linear_triton(x, weight, mask, scores, bias, ig_scale)
