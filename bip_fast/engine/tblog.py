"""``--tensorboard``: the values of ``metrics.jsonl`` also as TensorBoard events, in ``<run>/tensorboard/``.

Each metrics record (one per epoch) becomes scalars at step = its ``epoch`` (the run's global epoch):
every number under its own key as tag (``train_loss``, ``test_acc``, ``density``, ``seconds``,
``round``, ``segment_epoch``, ``skipped_steps``), dicts one level down as ``key/name``
(``lr/weights``, ``lr/scores``); strings (``segment``) and nulls (metrics.jsonl writes non-finite
values as null) are left out. TensorBoard stores float32: a value read back is the float32 of the
one in metrics.jsonl. Written through ``torch.utils.tensorboard.SummaryWriter`` (needs the
``tensorboard`` package, imported only when the option is on).

Resume: a record is written and flushed *before* the checkpoint of its epoch, so whatever a
checkpoint holds is in the events files too; a run killed between the two leaves events of an
epoch the resumed run trains again. Every session therefore opens its writer with ``purge_step``
= the first epoch it writes: the writer starts its file with a ``SessionLog.START`` event at that
step, and TensorBoard's readers discard the earlier files' events at or after it, so each step is
shown once, with the value metrics.jsonl holds. Readers take the files of a folder in name order,
and a name starts with its creation second: a session waits (under a second) until its second is
later than every existing file's. A fresh run (its first write is epoch 1) removes the events
files of the run it replaces (``--force``, or one that stopped before its first checkpoint); a
resumed run whose folder holds no events files writes the whole history first.
"""
from __future__ import annotations

import importlib
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["TB_DIR", "EventMirror", "require_tensorboard", "scalars"]

TB_DIR = "tensorboard"
_EVENTS = "events.out.tfevents.*"


def require_tensorboard() -> None:
    """ValueError (one line) unless ``torch.utils.tensorboard`` imports (the ``tensorboard`` package)."""
    try:
        importlib.import_module("torch.utils.tensorboard")  # imports the optional tensorboard package
    except ImportError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"tensorboard: --tensorboard writes through torch.utils.tensorboard, which needs the "
                         f"'tensorboard' package (pip install tensorboard): {reason}") from None


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The TensorBoard tags and values of one metrics.jsonl record (see the module docstring)."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key == "epoch":
            continue  # the step
        items = [(f"{key}/{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
        for tag, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[tag] = float(v)
    return out


class EventMirror:
    """Writes the run's metrics records into ``out/tensorboard`` (``enabled`` and ``out`` set;
    otherwise every method does nothing). Construction checks that the package is there, so a
    run that asks for it fails before touching anything; the writer opens at the first
    :meth:`write`. A context manager: leaving it closes the writer (flushed) however the run ends."""

    def __init__(self, enabled: bool, out: Optional[Path]) -> None:
        if enabled:
            require_tensorboard()
        self.folder = Path(out) / TB_DIR if enabled and out is not None else None
        self._writer = None

    def write(self, history: List[Dict[str, Any]]) -> None:
        """Write ``history[-1]`` (the epoch just finished) and flush; the first call of a session
        opens the writer (``purge_step`` = that epoch) and may write the earlier records too."""
        if self.folder is None or not history:
            return
        todo = history[-1:]
        if self._writer is None:
            todo = self._open(history)
        for rec in todo:
            for tag, value in scalars(rec).items():
                self._writer.add_scalar(tag, value, global_step=int(rec["epoch"]))
        self._writer.flush()

    def _open(self, history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        from torch.utils.tensorboard import SummaryWriter

        first = int(history[-1]["epoch"])
        old = sorted(self.folder.glob(_EVENTS)) if self.folder.is_dir() else []
        if first == 1:  # a fresh run: the events of the run it replaces go
            for p in old:
                p.unlink()
            old = []
        todo = history if not old else history[-1:]  # no events yet: the whole history
        stamps = [int(p.name.split(".")[3]) for p in old if p.name.split(".")[3].isdigit()]
        wait = max(stamps, default=0) + 1 - time.time()
        if 0 < wait <= 1:  # the new file's name must sort after the old ones (see the module docstring)
            time.sleep(wait)
        self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=int(todo[0]["epoch"]))
        return todo

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "EventMirror":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
