"""Crash-safe checkpoints and RNG state capture.

``save_atomic`` never leaves a half-written checkpoint under the final name: the object is written
to a temporary file in the same directory, flushed and fsync'ed, moved over the target with
``os.replace`` (atomic on POSIX and Windows), and the directory entry is fsync'ed. If anything
fails before the rename, the previous checkpoint is untouched and the temporary file is removed.
A Ctrl-C (SIGINT) that arrives during the write is held back until the file is in place, so an
interrupt never leaves a half-written temporary file or a traceback from inside the write. A
failed write (disk full, read-only folder) raises OSError naming the file.

Every file carries a SHA-256 of its content as the zip comment of the archive
(:mod:`bip_fast.files.integrity`; plain ``torch.load`` still reads it) and :func:`load` verifies
it: a file changed after it was written raises ValueError. Files without a checksum (older ones)
load unverified.

``load`` reads checkpoints written by this project with ``torch.load(weights_only=False)``:
they hold plain Python objects (hyper-parameter dicts, RNG states from ``random.getstate()`` and
numpy) that the weights-only unpickler rejects. Unpickling can execute code, so only load
checkpoints you (or this project) wrote; use ``torch.load(..., weights_only=True)`` directly for
files of unknown origin.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import integrity

__all__ = ["save_atomic", "write_text_atomic", "load", "rng_state", "set_rng_state", "defer_sigint"]


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still happened
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def defer_sigint():
    """Hold back SIGINT inside the block (main thread only); a Ctrl-C received meanwhile is sent
    again when the block ends, to the handler in place then: KeyboardInterrupt under Python's
    default handler, nothing where SIGINT is ignored (a held-back signal used to be raised as
    KeyboardInterrupt even there, so an ignored Ctrl-C got through only when it hit a write)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler installed outside Python, which could not be put back
        return
    got = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except ValueError:  # no signals here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        signal.raise_signal(signal.SIGINT)


def save_atomic(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with a content checksum (the parent directory
    is created if needed)."""
    path = _check_path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    view = buf.getbuffer()
    _write_atomic((view[:-2], integrity.sealed_tail(view)), path)  # the archive, its comment: no copy


def write_text_atomic(path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically: the same temporary file, fsync and rename as
    :func:`save_atomic`, without a checksum (text files are read by people and YAML parsers)."""
    _write_atomic((text.encode("utf-8"),), _check_path(path))


def _write_atomic(parts, path: Path) -> None:
    """``parts`` to ``path`` through a temporary file, a Ctrl-C held back until it is in place."""
    directory = path.parent if str(path.parent) else Path(".")
    with defer_sigint():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _write_replace(parts, path, directory)
        except OSError as e:
            raise OSError(e.errno, f"writing '{path}' failed: {e.strerror or e}") from e


def _write_replace(parts, path: Path, directory: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if os.name == "posix":  # mkstemp creates 0600; give the file the usual umask mode
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def load(path, map_location="cpu"):
    """Load a checkpoint written by :func:`save_atomic` (see the module note on weights_only).

    Raises FileNotFoundError if ``path`` does not exist and ValueError if it is not a readable
    checkpoint (truncated, garbage, not a torch file) or its content does not match its checksum
    (:class:`bip_fast.files.integrity.ChecksumError`).
    """
    path = _check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist"
                                + (" (it is a directory)" if path.is_dir() else ""))
    data = integrity.unseal(path.read_bytes(), path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        raise ValueError(f"checkpoint '{path}' is corrupt or unreadable: "
                         f"{type(e).__name__}: {e}") from e


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def rng_state() -> dict:
    """Capture Python ``random``, numpy's global RNG (if numpy is imported), torch's CPU RNG and,
    when CUDA is initialised, the RNG of every CUDA device."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    if _cuda_ready():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a state from :func:`rng_state`. Parts the state lacks are left alone; CUDA states
    are restored when CUDA is available (a warning says so when they cannot be)."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict from rng_state(), got {type(state).__name__}")
    unknown = set(state) - {"python", "torch", "numpy", "cuda"}
    if unknown:
        raise ValueError(f"state: unexpected keys {sorted(unknown)}; expected a subset of "
                         f"['cuda', 'numpy', 'python', 'torch']")
    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        t = state["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise ValueError("state['torch']: expected a uint8 tensor from torch.get_rng_state()")
        torch.set_rng_state(t.cpu())
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state:
        cuda_states = list(state["cuda"])
        if not torch.cuda.is_available():
            warnings.warn("set_rng_state: the state holds CUDA RNG states but CUDA is not "
                          "available here; they were not restored", RuntimeWarning, stacklevel=2)
        else:
            n = torch.cuda.device_count()
            if len(cuda_states) != n:
                warnings.warn(f"set_rng_state: the state holds {len(cuda_states)} CUDA RNG "
                              f"states, this machine has {n} devices; restoring the first "
                              f"{min(n, len(cuda_states))}", RuntimeWarning, stacklevel=2)
            for i, s in enumerate(cuda_states[:n]):
                torch.cuda.set_rng_state(s.cpu(), i)
