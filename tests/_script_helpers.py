"""Loading a benchmark or script module from its file (the folders are not packages)."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str, folder: str = "benchmarks") -> ModuleType:
    """``ROOT/folder/name.py`` as a fresh module, registered in ``sys.modules`` (dataclasses look
    their module up while a class is built)."""
    path = os.path.join(ROOT, folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bip_fast_{folder}_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
