"""One run per folder: the run-folder lock, stale locks, folders that cannot be written, reruns after a stop."""
import errno
import json
import os

import pytest

from bip_fast.engine.loop import Trainer
from bip_fast.files.runlock import LOCK_NAME, RunLock, RunLockedError

from _integrity_helpers import run_tiny
from test_loop import config, synthetic, tiny_model


# ----------------------------------------------------------------------------- 1. one run per folder
def test_lock_refuses_a_second_owner_and_releases(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, "prune") as lock:
        rec = json.loads((out / LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid() and rec["host"]
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(out).acquire()  # another open file description: the flock conflicts
        with pytest.raises(RunLockedError, match="in use"):
            Trainer(config(out, command="pretrain", method="dense", epochs=1), dataset=synthetic(),
                    model_fn=tiny_model).run()
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
        assert lock.held
    assert not (out / LOCK_NAME).exists() and not out.exists()  # the lock created the folder: gone


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = {"pid": 999999, "host": "elsewhere", "started": 0, "command": "prune"}
    (out / LOCK_NAME).write_text(json.dumps(dead))  # left by a kill -9: no flock holds it
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"x" * 100)  # and a killed write's leftover
    tr, rep = run_tiny(out)
    assert rep["epochs"] == 1 and (out / "checkpoint.pt").is_file()
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- unwritable, stopped
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_read_only_folder_refused_before_training(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="out: cannot write in .*Permission denied"):
            Trainer(config(out, command="pretrain", method="dense", epochs=1), dataset=synthetic(),
                    model_fn=tiny_model).run()
    finally:
        out.chmod(0o700)


def test_read_only_filesystem_refused_before_training(tmp_path, monkeypatch):
    real_open = os.open

    def ro_open(path, *a, **kw):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *a, **kw)

    loaded = []
    monkeypatch.setattr(os, "open", ro_open)
    tr = Trainer(config(tmp_path / "run", command="pretrain", method="dense", epochs=1), dataset=synthetic(),
                 model_fn=tiny_model)
    tr._setup_device_and_data = lambda: loaded.append(1)
    with pytest.raises(ValueError, match="out: cannot write in .*Read-only file system"):
        tr.run()
    assert not loaded and not (tmp_path / "run").exists()


def test_run_stopped_before_its_first_checkpoint_can_be_rerun(tmp_path):
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(trainer, record):
        raise Stop

    tr = Trainer(config(out, command="pretrain", method="dense", epochs=1), dataset=synthetic(),
                 model_fn=tiny_model)
    tr._save = lambda *a: (_ for _ in ()).throw(Stop())  # dies before its first checkpoint
    with pytest.raises(Stop):
        tr.run()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    with pytest.raises(FileNotFoundError, match="rerun the command without --resume"):
        Trainer(config(out, resume=True), dataset=synthetic(), model_fn=tiny_model)
    run_tiny(out)  # no --force needed: nothing of value was there
