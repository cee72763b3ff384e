"""The files a run writes (ground floor: imports torch and the standard library only).

- :mod:`.checkpoint`: crash-safe atomic writes (torch objects and text), checksummed loads, RNG
  state capture.
- :mod:`.integrity`: the SHA-256 content checksum carried in each torch file's zip comment.
- :mod:`.runlock`: one run per folder, an ``flock`` that a dead owner releases.
"""
from __future__ import annotations

from . import checkpoint, integrity, runlock
from .checkpoint import load, rng_state, save_atomic, set_rng_state, write_text_atomic
from .integrity import ChecksumError
from .runlock import LOCK_NAME, RunLock, RunLockedError

__all__ = [
    "checkpoint", "integrity", "runlock",
    "load", "save_atomic", "write_text_atomic", "rng_state", "set_rng_state",
    "ChecksumError", "LOCK_NAME", "RunLock", "RunLockedError",
]
