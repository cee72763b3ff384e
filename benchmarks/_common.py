"""Shared helpers for the benchmark scripts: environment header, timing, tables, JSON.

The environment (device, versions, commit), the result paths and ``log`` are defined here; the
timing (``_timing.py``) and the result rows, tables and JSON files (``_results.py``) live in
their own modules and are re-exported, so that every script reaches all of them as ``C.<name>``.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch

try:  # imported as part of a package (python -m benchmarks.<script>)
    from ._results import Row, _fmt_ms, markdown_table, write_json
    from ._timing import INTERLEAVED, Timing, bench, chunk_timer, interleaved, measure_bandwidth, synchronize
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _results import Row, _fmt_ms, markdown_table, write_json  # type: ignore[no-redef]
    from _timing import (  # type: ignore[no-redef]
        INTERLEAVED, Timing, bench, chunk_timer, interleaved, measure_bandwidth, synchronize)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "Timing",
    "Row",
    "git_commit",
    "device_name",
    "device_slug",
    "environment",
    "format_header",
    "synchronize",
    "bench",
    "interleaved",
    "chunk_timer",
    "INTERLEAVED",
    "measure_bandwidth",
    "markdown_table",
    "write_json",
    "_fmt_ms",  # step.py formats its own table's milliseconds the same way
]


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def git_commit(root: str = REPO_ROOT, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """{"commit": short hash or "unknown", "dirty": bool or None} of the working tree (changes to
    tracked files only; paths under ``exclude``, relative to ``root``, do not count)."""
    out: Dict[str, Any] = {"commit": "unknown", "dirty": None}
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip() or "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
            + [f":(exclude){p}" for p in exclude],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device) -> str:
    """File-name friendly device id: "cpu", or the GPU name ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def _triton_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # not installed
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Everything needed to reproduce or compare a result file."""
    env: Dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    env.update(git_commit())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    try:
        import bip_fast

        info = bip_fast.build_info()
        env["bip_fast_build"] = dict(info)
    except Exception as e:  # the header must print even when the package is half built
        env["bip_fast_build"] = {"error": f"{type(e).__name__}: {e}"}
    return env


def format_header(env: Dict[str, Any], title: str) -> str:
    dirty = "" if not env.get("dirty") else " (dirty tree)"
    lines = [
        f"# {title}",
        "",
        f"- device: {env['device_name']} ({env['device']})",
        f"- torch {env['torch']}, triton {env['triton'] or 'not installed'}, python {env['python']}",
        f"- commit: {env['commit']}{dirty}",
        f"- CPU: {env['cpu_model']}, {env['cpu_count']} cores usable, torch threads {env['torch_threads']}",
    ]
    if "cuda" in env:
        lines.append(
            f"- CUDA {env['cuda']}, capability {env['capability']}, {env['sm_count']} SMs, "
            f"{env['gpu_memory_gib']} GiB, TF32 matmul={env['tf32_matmul']}"
        )
    build = env.get("bip_fast_build") or {}
    if build:
        scalars = {k: v for k, v in build.items() if isinstance(v, (str, int, float, bool, type(None)))}
        lines.append("- bip_fast build: " + ", ".join(f"{k}={v}" for k, v in scalars.items()))
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
