"""Checkpoint files: checksums, corrupt checkpoints refused, atomic writes kept through a full disk or Ctrl-C."""
import errno
import os
import signal

import pytest
import torch

from bip_fast.engine.loop import Trainer
from bip_fast.files import checkpoint as ckpt
from bip_fast.files import integrity

from _integrity_helpers import flip_tensor_bytes, run_tiny
from test_loop import config, synthetic, tiny_model


# ----------------------------------------------------------------------------- 3. checksums
def test_checksum_sealed_files_still_load_with_plain_torch(tmp_path):
    sd = {"w": torch.arange(1000, dtype=torch.float32)}
    ckpt.save_atomic(sd, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    assert integrity.status(data) == "verified"
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], sd["w"])
    assert torch.equal(ckpt.load(tmp_path / "m.pt")["w"], sd["w"])
    torch.save(sd, tmp_path / "old.pt")  # a file from before checksums: loads unverified
    assert integrity.status((tmp_path / "old.pt").read_bytes()) == "unsealed"
    assert torch.equal(ckpt.load(tmp_path / "old.pt")["w"], sd["w"])


def test_checksum_mismatch_is_one_clear_error(tmp_path):
    ckpt.save_atomic({"w": torch.randn(4096)}, tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt")  # plain torch would not notice the flip below
    flip_tensor_bytes(tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt")
    with pytest.raises(integrity.ChecksumError, match="corrupted: its content does not match its checksum"):
        ckpt.load(tmp_path / "m.pt")


def test_corrupt_checkpoint_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    run_tiny(out)
    before = (out / "model.pt").read_bytes()
    flip_tensor_bytes(out / "checkpoint.pt")
    with pytest.raises(ValueError, match="corrupted"):
        Trainer(config(out, resume=True), dataset=synthetic(), model_fn=tiny_model)
    assert (out / "model.pt").read_bytes() == before


# ----------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    ckpt.save_atomic({"w": torch.ones(3)}, tmp_path / "c.pt")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"writing '.*c\.pt' failed: No space left on device"):
        ckpt.save_atomic({"w": torch.zeros(3)}, tmp_path / "c.pt")
    monkeypatch.undo()
    assert torch.equal(ckpt.load(tmp_path / "c.pt")["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.fixture
def sigint_handler():
    """Sets the SIGINT handler for a test (pytest may run with SIGINT ignored, as a background
    job), and puts the previous one back."""
    previous = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, previous)


def test_sigint_during_a_write_is_held_back(tmp_path, sigint_handler):
    sigint_handler(signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        with ckpt.defer_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            ckpt.save_atomic({"w": torch.ones(3)}, tmp_path / "c.pt")  # completes first
    assert torch.equal(ckpt.load(tmp_path / "c.pt")["w"], torch.ones(3))


def test_held_back_sigint_goes_to_the_handler_in_place(tmp_path, sigint_handler):
    """After the write the signal is sent again, to whatever handles SIGINT then: a handler of
    the caller's gets it once, an ignored SIGINT stays ignored (it used to become a
    KeyboardInterrupt there, so an ignored Ctrl-C got through only when it hit a write)."""
    got = []
    sigint_handler(lambda signum, frame: got.append(signum))
    with ckpt.defer_sigint():
        os.kill(os.getpid(), signal.SIGINT)
        ckpt.save_atomic({"w": torch.ones(3)}, tmp_path / "c.pt")
        assert got == []
    assert got == [signal.SIGINT]
    sigint_handler(signal.SIG_IGN)
    with ckpt.defer_sigint():
        os.kill(os.getpid(), signal.SIGINT)
        ckpt.save_atomic({"w": torch.zeros(3)}, tmp_path / "c.pt")
    assert torch.equal(ckpt.load(tmp_path / "c.pt")["w"], torch.zeros(3))
