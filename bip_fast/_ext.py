"""Loader for the compiled parts of bip_fast, with a record of why anything is missing.

``bip_fast._C`` holds every C++ op schema (``torch.ops.bip_fast.*``) and the CPU kernels;
``bip_fast._C_cuda`` holds only CUDA kernels for the same schemas, so it is loaded after ``_C``.
Importing this module loads nothing and never touches CUDA; :func:`load` (called lazily by the
query functions) imports the extensions, never raises, and records exception texts, which
:func:`build_info` reports together with the environment switches seen.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading

__all__ = ["load", "cpu_available", "cuda_ext_available", "build_info", "SKIP_ENV_VARS"]

# Build/runtime switches reported by build_info() (see setup.py).
SKIP_ENV_VARS = ("BIP_FAST_SKIP_EXT", "BIP_FAST_SKIP_CUDA", "BIP_FAST_CUDA_ARCHS")

_lock = threading.Lock()
_loaded = False
_state = {"cpu_loadable": False, "cuda_loadable": False}
_reasons: dict[str, str] = {}


def _module_file(name: str) -> str | None:
    """Path of the compiled module file, without executing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a broken parent package etc.
        return None
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    return spec.origin


def _why_not_compiled(component: str) -> str:
    for var in ("BIP_FAST_SKIP_EXT",) + (("BIP_FAST_SKIP_CUDA",) if component == "cuda" else ()):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"not compiled ({var} is set)"
    if component == "cuda":
        import torch

        if torch.version.cuda is None:
            return "not compiled: this torch has no CUDA (torch.version.cuda is None)"
        return ("not compiled: bip_fast/_C_cuda*.so missing (no nvcc at build time, no .cu "
                "sources, or the CUDA compile failed: reinstall with `pip install -e . "
                "--no-build-isolation -v` and read the 'bip_fast build:' lines)")
    return ("not compiled: bip_fast/_C*.so missing (pure-Python install or build failure: "
            "reinstall with `pip install -e . --no-build-isolation -v`)")


def load() -> bool:
    """Imports bip_fast._C, its fake kernels, then bip_fast._C_cuda. Never raises.

    Returns whether the CPU extension (and with it every op schema) is loaded.
    """
    global _loaded
    if _loaded:
        return _state["cpu_loadable"]
    with _lock:
        if _loaded:
            return _state["cpu_loadable"]
        try:
            importlib.import_module("bip_fast._C")
            _state["cpu_loadable"] = True
        except Exception as e:
            _reasons["cpu"] = (f"import bip_fast._C failed: {type(e).__name__}: {e}"
                               if _module_file("bip_fast._C") else _why_not_compiled("cpu"))
        if _state["cpu_loadable"]:
            try:
                importlib.import_module("bip_fast.ops._cpp_fake")
            except Exception as e:
                _reasons["fake"] = f"registering fake kernels failed: {type(e).__name__}: {e}"
            try:
                importlib.import_module("bip_fast._C_cuda")
                _state["cuda_loadable"] = True
            except Exception as e:
                _reasons["cuda"] = (f"import bip_fast._C_cuda failed: {type(e).__name__}: {e}"
                                    if _module_file("bip_fast._C_cuda")
                                    else _why_not_compiled("cuda"))
        else:
            _reasons["cuda"] = "needs bip_fast._C (op schemas), which is not loaded"
        _loaded = True
    return _state["cpu_loadable"]


def cpu_available() -> bool:
    """True when the C++ op schemas and CPU kernels are loaded."""
    return load()


def cuda_ext_available() -> bool:
    """True when the CUDA kernels extension is loaded (does not check for a GPU)."""
    load()
    return _state["cuda_loadable"]


def _triton_version() -> tuple[str | None, str | None]:
    try:
        import triton  # lazy: only when asked

        return str(getattr(triton, "__version__", "unknown")), None
    except Exception as e:
        return None, f"import triton failed: {type(e).__name__}: {e}"


def build_info() -> dict:
    """What is compiled, what loads, and why not. Never raises, never initialises CUDA.

    Keys: cpu_compiled, cpu_loadable, cuda_compiled, cuda_loadable (bool), triton_version
    (str or None), torch_version (str), torch_cuda (str or None), reasons (component -> text,
    for anything missing), env (switch name -> value or None).
    """
    import torch

    load()
    reasons = dict(_reasons)
    triton_version, triton_reason = _triton_version()
    if triton_reason:
        reasons["triton"] = triton_reason
    return {
        "cpu_compiled": _module_file("bip_fast._C") is not None,
        "cpu_loadable": bool(_state["cpu_loadable"]),
        "cuda_compiled": _module_file("bip_fast._C_cuda") is not None,
        "cuda_loadable": bool(_state["cuda_loadable"]),
        "triton_version": triton_version,
        "torch_version": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "reasons": reasons,
        "env": {k: os.environ.get(k) for k in SKIP_ENV_VARS},
    }
