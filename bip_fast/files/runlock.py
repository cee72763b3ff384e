"""One run per folder: an exclusive lock on ``<run folder>/.bip_fast.lock`` for the whole run.

The lock is an advisory ``flock`` on the lock file, so the kernel releases it when its owner dies
in any way (kill -9 included): a lock left behind by a dead run is stale by construction and the
next run takes it over. The file records the owner (pid, host, start time) for the message a
second run gets, and for the person reading the folder. On release the file is removed; a run
that finds the lock file replaced between its open and its flock retries on the new file, so
two runs starting at the same moment cannot both win.

Taking the lock is also the first write into the folder, so it doubles as the writability check
of the output folder (a read-only folder is refused before any data is loaded or trained on).
While holding the lock, leftovers of killed writes (``.<name>.*.tmp``) are removed.

Where ``fcntl`` is missing (Windows) the lock is an exclusive create of the same file; a stale
one must then be removed by hand, as the message says.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME", "remove_stale_tmp"]

LOCK_NAME = ".bip_fast.lock"


class RunLockedError(ValueError):
    """Another live run holds the folder."""


def _owner_text(fd: int) -> Dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
        rec = json.loads(raw.decode() or "{}")
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(rec: Dict[str, Any]) -> str:
    if not rec:
        return "another run"
    since = rec.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} (since {when}, command {rec.get('command', '?')})"


def remove_stale_tmp(folder: Path) -> List[str]:
    """Delete temporary files of interrupted atomic writes (``.<file>.<random>.tmp``, ``.<file>.tmp``)."""
    gone = []
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            try:
                p.unlink()
                gone.append(p.name)
            except OSError:
                pass
    return gone


class RunLock:
    """Exclusive ownership of a run folder (a context manager; see the module docstring).

    ``acquire()`` creates the folder if needed; it raises :class:`RunLockedError` (a ValueError)
    when a live run holds it and ValueError when the folder cannot be written. ``release()``
    removes the lock file, and the folder too if this lock created it and it stayed empty.
    ``previous_owner`` is the record a dead owner left (a stale lock taken over), else None.
    """

    def __init__(self, folder, command: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._fd: Optional[int] = None
        self._created = False
        self.previous_owner: Optional[Dict[str, Any]] = None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "command": self.command}).encode()

    def _open_locked(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner_text(fd)
                os.close(fd)
                raise RunLockedError(f"out: '{self.folder}' is in use by {_describe(owner)}; one run per "
                                     f"folder: wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the owner released (and removed) the file between our open and flock

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"out: '{self.folder}' exists and is not a directory")
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
        except FileExistsError:  # no fcntl: an exclusive create lost
            raise RunLockedError(f"out: '{self.folder}' is in use by another run (or one that died: remove "
                                 f"'{self.path}' if no run is using the folder)") from None
        except OSError as e:
            self._remove_created_folder()
            raise ValueError(f"out: cannot write in '{self.folder}': {e.strerror or e}") from None
        try:
            prev = _owner_text(fd)
            self.previous_owner = prev or None
            os.ftruncate(fd, 0)
            os.write(fd, self._record())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self._unlink()
            self._remove_created_folder()
            raise ValueError(f"out: cannot write in '{self.folder}': {e.strerror or e}") from None
        self._fd = fd
        remove_stale_tmp(self.folder)
        return self

    def _unlink(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass

    def _remove_created_folder(self) -> None:
        if self._created:
            try:
                self.folder.rmdir()  # only if empty
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._unlink()  # while still holding the lock: a waiting run then retries on a new file
        os.close(self._fd)
        self._fd = None
        self._remove_created_folder()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
