"""Real full and read-only filesystems (a size-limited tmpfs; skipped where mounting is not allowed):
a full disk mid-run keeps the last checkpoint and leaves no temporary file, the run resumes
bit-identically once there is room; a read-only folder is refused before any training, root included."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from bip_fast.cli import main
from bip_fast.engine.loop import Trainer
from bip_fast.files import checkpoint as ckpt
from bip_fast.files.runlock import LOCK_NAME

from test_loop import config, synthetic, tiny_model


def _mount(path, *opts):
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs of its own, unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.name != "posix" or shutil.which("mount") is None or not _mount(mnt, "size=2m"):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _remount_read_only(mnt):
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)


def _fill(mnt):
    """Write a filler file until the filesystem refuses (ENOSPC)."""
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _trainer(out, epochs=3, callbacks=(), resume=False):
    return Trainer(config(out, command="pretrain", method="dense", epochs=epochs, lr=0.05, resume=resume),
                   dataset=synthetic(), model_fn=tiny_model, callbacks=list(callbacks))


def test_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(small_fs, tmp_path):
    ref = _trainer(tmp_path / "ref").run()
    out = small_fs / "run"
    kept = {}

    def fill_after_epoch_1(trainer, record):
        if record["epoch"] == 1:
            kept["ckpt"] = (out / "checkpoint.pt").read_bytes()
            kept["metrics"] = (out / "metrics.jsonl").read_text()
            _fill(small_fs)

    with pytest.raises(OSError, match=r"writing '.*checkpoint.pt' failed: No space left on device"):
        _trainer(out, callbacks=[fill_after_epoch_1]).run()
    assert (out / "checkpoint.pt").read_bytes() == kept["ckpt"]  # untouched, and its checksum verifies:
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1
    assert (out / "metrics.jsonl").read_text() == kept["metrics"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no leftover temporaries
    assert not (out / LOCK_NAME).exists() and not (out / "model.pt").exists()
    (small_fs / "filler").unlink()
    rep = _trainer(out, resume=True).run()
    assert rep["test_acc"] == ref["test_acc"]
    a, b = ckpt.load(out / "model.pt"), ckpt.load(tmp_path / "ref" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_before_the_first_write_is_one_line(small_fs, capsys):
    _fill(small_fs)
    code = main(["pretrain", "--out", str(small_fs / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.count("\n") == 1 and "No space left on device" in err, err
    assert "Traceback" not in err and not (small_fs / "run").exists()


def test_read_only_filesystem_refuses_new_and_resumed_runs_before_training(small_fs, capsys):
    out = small_fs / "run"

    class Stop(Exception):
        pass

    def stop(trainer, record):
        raise Stop

    with pytest.raises(Stop):
        _trainer(out, epochs=2, callbacks=[stop]).run()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _remount_read_only(small_fs)
    tr = _trainer(out, epochs=2, resume=True)
    tr._train_epoch = lambda seg: pytest.fail("trained on a read-only filesystem")
    with pytest.raises(ValueError, match=r"out: cannot write in .*Read-only file system"):
        tr.run()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code = main(["pretrain", "--out", str(small_fs / "new"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err, err
    assert json.loads(json.dumps(sorted(p.name for p in small_fs.iterdir()))) == ["run"]
