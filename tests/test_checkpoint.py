"""Tests for bip_fast.files.checkpoint: atomic saves, corrupt-file detection, RNG capture."""
import random

import numpy as np
import pytest
import torch

from bip_fast.files.checkpoint import load, rng_state, save_atomic, set_rng_state


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_roundtrip_and_overwrite(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"  # parent is created
    obj = {"w": torch.arange(10.0), "step": 3, "hp": {"lr": 0.1}, "rng": random.getstate()}
    save_atomic(obj, path)
    got = load(path)
    assert torch.equal(got["w"], obj["w"]) and got["step"] == 3 and got["hp"] == {"lr": 0.1}
    assert got["rng"] == obj["rng"]
    save_atomic({"step": 4}, str(path))
    assert load(path) == {"step": 4}
    assert _leftovers(path.parent) == []


def test_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # something reached the disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load(path)["step"] == 1
    assert _leftovers(tmp_path) == []
    # also when there was no previous file: nothing appears under the final name
    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", crashing_save)
        with pytest.raises(OSError):
            save_atomic({"step": 2}, tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists() and _leftovers(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="directory"):
        load(tmp_path)
    with pytest.raises(TypeError, match="path"):
        load(3)


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"w": torch.randn(1000), "step": 5}, path)
    raw = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"checkpoint '.*trunc\.pt' is corrupt or unreadable: "):
        load(trunc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"checkpoint '.*garbage\.pt' is corrupt or unreadable"):
        load(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt"):
        load(empty)


def test_map_location(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"w": torch.ones(2)}, path)
    assert load(path, map_location="cpu")["w"].device.type == "cpu"


def _draw():
    return (random.random(), np.random.rand(), torch.rand(3))


def test_rng_state_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    _draw()
    state = rng_state()
    assert {"python", "numpy", "torch"} <= set(state)
    first = _draw()
    # through a checkpoint file, as the trainer does
    save_atomic({"rng": state}, tmp_path / "r.pt")
    _draw()
    set_rng_state(load(tmp_path / "r.pt")["rng"])
    second = _draw()
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_rng_state_cuda_only_when_initialised():
    state = rng_state()
    ready = torch.cuda.is_available() and torch.cuda.is_initialized()
    assert ("cuda" in state) == ready
    if ready:
        assert len(state["cuda"]) == torch.cuda.device_count()


def test_set_rng_state_validation():
    with pytest.raises(TypeError, match="state"):
        set_rng_state([1, 2])
    with pytest.raises(ValueError, match="unexpected keys"):
        set_rng_state({"python": random.getstate(), "jax": 1})
    with pytest.raises(ValueError, match="torch"):
        set_rng_state({"torch": torch.zeros(3)})
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="CUDA"):
            set_rng_state({"cuda": [torch.zeros(16, dtype=torch.uint8)]})
