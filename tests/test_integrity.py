"""Nothing lost, nothing silent: run-folder lock, checksums, run consistency, the divergence guard,
layers that cannot be masked, and input checks that run before the folder is touched.

Library-level cases use a tiny CNN on synthetic data (fast); the CLI cases at the end use a
64-image CIFAR-10 subset, like tests/test_cli.py."""
import errno
import json
import math
import os
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bip_fast
from bip_fast.cli import main
from bip_fast.files import checkpoint as ckpt
from bip_fast.files import integrity
from bip_fast.engine.loop import DivergedError, Trainer
from bip_fast.files.runlock import LOCK_NAME, RunLock, RunLockedError
from bip_fast.masks import project
from bip_fast.pruning import get_algorithm
from bip_fast.pruning.base import NonFiniteError

from test_cli import DATA, QUICK, cli, needs_data
from test_loop import config, synthetic, tiny_model


def flip_tensor_bytes(path, n=32):
    """Flip ``n`` bytes in the middle of the largest tensor record of a torch zip file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    mid = start + info.file_size // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0x5A
    open(path, "wb").write(bytes(raw))


def run_tiny(out, **kw):
    base = dict(command="pretrain", method="dense", epochs=1, lr=0.05)
    base.update(kw)
    tr = Trainer(config(out, **base), dataset=synthetic(), model_fn=tiny_model)
    return tr, tr.run()


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


# ----------------------------------------------------------------------------- 2. one run, one record
def test_checkpoint_from_another_run_is_refused(tmp_path):
    run_tiny(tmp_path / "a")
    run_tiny(tmp_path / "b", arch="resnet56", command="pretrain")  # config records another arch
    (tmp_path / "b" / "checkpoint.pt").write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match="arch='resnet20'.*arch='resnet56'.*do not belong to one run"):
        Trainer(config(tmp_path / "b", resume=True), dataset=synthetic(), model_fn=tiny_model)
    from bip_fast.engine.rundir import read_model_file as _read_model_file

    with pytest.raises(ValueError, match="do not belong to one run"):
        _read_model_file(tmp_path / "b" / "checkpoint.pt", "checkpoint")


# ----------------------------------------------------------------------------- 4. divergence
def test_nonfinite_batch_applies_no_update():
    torch.manual_seed(0)
    for name, kw in (("bip", {}), ("omp", {}), ("bip", {"variant": "official"})):
        alg = get_algorithm(name)(tiny_model(), 0.5, **kw)
        x = torch.randn(8, 3, 32, 32)
        y = torch.randint(0, 10, (8,))
        alg.step((x, y))
        model = {k: v.clone() for k, v in alg.model.state_dict().items()}
        state = alg.state_dict(include_model=False)
        bad = x.clone()
        bad[0, 0, 0, 0] = math.inf
        with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
            alg.step((bad, y))
        for k, v in alg.model.state_dict().items():  # weights, scores, masks, BN statistics
            assert torch.equal(v, model[k]), (name, k)
        for k, g in alg.param_groups.items():  # momenta
            for a, b in zip(g.buffers, state["optimizers"][k]["buffers"]):
                assert torch.equal(a, b), (name, k)
        assert alg.global_step == 1
        alg.step((x, y))  # training goes on from the untouched state


def test_divergence_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"

    def explode(trainer, record):  # after a good epoch 1, a learning rate that overflows
        for g in trainer.alg.param_groups.values():
            g.lr = 1e30

    tr = Trainer(config(out, command="pretrain", method="dense", epochs=3, lr=0.05), dataset=synthetic(),
                 model_fn=tiny_model, callbacks=[explode])
    good = None
    orig_save = tr._save

    def save(*a):
        nonlocal good
        orig_save(*a)
        good = (out / "checkpoint.pt").read_bytes()

    tr._save = save
    with pytest.raises(DivergedError, match=r"diverged: .*epoch 2 .*the last checkpoint .*epoch 1\) is kept"):
        tr.run()
    assert (out / "checkpoint.pt").read_bytes() == good and not (out / "model.pt").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    state = ckpt.load(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_skips_are_bounded(tmp_path):
    def poisoned(limit):
        tr = Trainer(config(tmp_path / f"run{limit}", command="pretrain", method="dense", epochs=1, lr=0.05,
                            nonfinite_skips=limit), dataset=synthetic(), model_fn=tiny_model)
        calls = {"n": 0}

        def shard(batch):
            calls["n"] += 1
            if calls["n"] != 2:
                return batch
            x = batch[0].clone()
            x.view(-1)[0] = math.nan
            return x, batch[1]

        tr._shard = shard
        return tr

    rep = poisoned(1).run()
    rec = json.loads((tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_steps"] == 1 and math.isfinite(rec["train_loss"]) and rep["epochs"] == 1
    with pytest.raises(DivergedError, match="step 1: non-finite loss"):
        poisoned(0).run()
    resumed = Trainer(config(tmp_path / "run1", resume=True, nonfinite_skips=3), dataset=synthetic(),
                      model_fn=tiny_model)
    assert resumed.cfg.train.nonfinite_skips == 3


# ----------------------------------------------------------------------------- 5-6. masked or named
def test_swin_t_attention_weights_are_named_not_silently_unmasked():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(num_classes=10)
    with pytest.warns(UserWarning, match=r"24 layer\(s\) left dense.*features\.1\.0\.attn\.qkv"):
        bip_fast.sparsify(model)
    rep = bip_fast.sparsity_report(model)
    assert len(rep["skipped"]) == 24 and all("ShiftedWindowAttention" in s["reason"] for s in rep["skipped"])
    assert not any(n.endswith(("attn.qkv", "attn.proj")) for n, _ in bip_fast.masked_modules(model))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.linear(x, self.fc.weight, self.fc.bias).relu())


class ReadsWeightIndirectly(ReadsWeight):
    def forward(self, x):
        lin = getattr(self, "fc")
        return self.head(F.linear(x, getattr(lin, "weight"), lin.bias).relu())


def test_weight_read_outside_the_masked_forward():
    m = ReadsWeight()
    with pytest.warns(UserWarning, match=r"fc \(weight read directly by ReadsWeight"):
        bip_fast.sparsify(m)
    assert type(m.fc) is nn.Linear and bip_fast.sparsity_report(m)["skipped"][0]["name"] == "fc"
    # a use the source scan cannot see: refused by name at the first step, not a crash or silence
    for kw in ({}, {"variant": "official"}):
        alg = get_algorithm("bip")(ReadsWeightIndirectly(), 0.5, **kw)
        with pytest.raises(ValueError, match=r"weight of 'fc' \(MaskedLinear\) is used outside its masked forward"):
            alg.step((torch.randn(4, 8), torch.randint(0, 3, (4,))))


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(24, 16))
    model.add_module("att", nn.MultiheadAttention(16, 2))
    model.add_module("t", nn.ConvTranspose2d(2, 2, 3))
    with pytest.warns(UserWarning, match=r"3 layer\(s\) left dense.*0 \(unsupported layer type Conv1d\)"):
        bip_fast.sparsify(model)
    rep = bip_fast.sparsity_report(model)
    assert {s["name"]: s["type"] for s in rep["skipped"]} == {"0": "Conv1d", "att": "MultiheadAttention",
                                                             "t": "ConvTranspose2d"}
    assert rep["skipped"][1]["numel"] == 16 * 48 + 16 * 16  # in_proj_weight + out_proj.weight
    with pytest.warns(UserWarning, match="nothing|no nn.Conv2d / nn.Linear layer to mask"):
        bip_fast.sparsify(nn.Sequential(nn.ReLU()))


# ----------------------------------------------------------------------------- 7, 12. structure, inputs
@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_structured_masks_keep_one_filter_or_channel(structure):
    scores = [torch.randn(16, 8, 3, 3), torch.randn(10, 16)]
    for mk in project(scores, 0.01, structure):
        dim = 0 if structure == "filter" else 1
        alive = mk.transpose(0, dim).reshape(mk.shape[dim], -1).any(dim=1)
        assert int(alive.sum()) == 1


def test_input_messages():
    with pytest.raises(TypeError, match="include: expected a module name.*got int"):
        bip_fast.sparsify(nn.Linear(2, 2), include=123)
    with pytest.raises(ValueError, match=r"shape \(8, 1, 3, 3\)"):
        project([torch.randn(8, 1, 3, 3)], 0.5, "nm")


# ----------------------------------------------------------------------------- 9-11. files
def test_invalid_structure_touches_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="sparsity: 2:4 pruning removes 0.5"):
        Trainer(config(out, method="bip", structure="nm", sparsity=0.3, epochs=1), dataset=synthetic(),
                model_fn=tiny_model).run()
    assert not out.exists()


def test_nm_on_a_depthwise_conv_names_the_layer(tmp_path):
    def depthwise():
        return nn.Sequential(nn.ConstantPad3d((0, 0, 0, 0, 0, 1), 0.0), nn.Conv2d(4, 8, 3, padding=1),
                             nn.Conv2d(8, 8, 3, groups=8), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10))

    with pytest.raises(ValueError, match=r"layer '2' \(weight \(8, 1, 3, 3\)\) has 9"):
        Trainer(config(tmp_path / "run", method="bip", structure="nm", sparsity=0.5, pretrain_epochs=1, epochs=1),
                dataset=synthetic(), model_fn=depthwise).run()
    assert not (tmp_path / "run").exists()


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


def test_sigint_during_a_write_is_held_back(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ckpt.defer_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            ckpt.save_atomic({"w": torch.ones(3)}, tmp_path / "c.pt")  # completes first
    assert torch.equal(ckpt.load(tmp_path / "c.pt")["w"], torch.ones(3))


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


# ----------------------------------------------------------------------------- CLI
def test_cli_flag_checks(tmp_path, capsys):
    cases = [
        (["prune", "--out", str(tmp_path / "a"), "--resume", "--force"], "--force: cannot be combined with --resume"),
        (["pretrain", "--out", str(tmp_path / "b"), "--seed", "-1"], "seed: expected a non-negative integer"),
        (["eval", "--checkpoint", str(tmp_path), "--sparsity", "0.5"], "--sparsity: eval reads the model"),
        (["prune", "--out", str(tmp_path / "c"), "--structure", "nm", "--sparsity", "0.3"],
         "sparsity: 2:4 pruning removes 0.5"),
        (["prune", "--out", str(tmp_path / "d"), "--method", "hydra", "--structure", "nm", "--sparsity", "0.9"],
         "sparsity: 2:4 pruning removes 0.5"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_data
def test_cli_faults(tmp_path):
    run = tmp_path / "dense"
    cli("pretrain", *QUICK, "--out", run)
    model_before = (run / "model.pt").read_bytes()
    # --arch against the checkpoint's own record
    r = cli("eval", "--checkpoint", run, "--arch", "resnet56", "--data-dir", DATA, "--device", "cpu", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--arch:" in r.stderr
    # a second run on a folder in use
    with RunLock(tmp_path / "busy"):
        r = cli("pretrain", *QUICK, "--out", tmp_path / "busy", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "in use by pid" in r.stderr
    # divergence: one line, exit 2, strict JSON, no non-finite file
    r = cli("pretrain", *QUICK, "--lr", "1e6", "--epochs", "2", "--out", tmp_path / "nan", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "diverged" in r.stderr, r.stderr
    assert not (tmp_path / "nan" / "model.pt").exists()
    # a flipped byte in model.pt: eval refuses, a resume from a flipped checkpoint writes nothing
    flip_tensor_bytes(run / "checkpoint.pt")
    r = cli("pretrain", "--out", run, "--resume", "--epochs", "1", check=False)
    assert r.returncode == 2 and "corrupted" in r.stderr and r.stderr.count("\n") == 1
    assert (run / "model.pt").read_bytes() == model_before
    flip_tensor_bytes(run / "model.pt")
    r = cli("eval", "--checkpoint", run / "model.pt", "--data-dir", DATA, "--device", "cpu", "--subset", "64", "50",
            check=False)
    assert r.returncode == 2 and "corrupted" in r.stderr and r.stderr.count("\n") == 1


def _start(*args):
    import subprocess
    import sys

    from test_cli import ROOT

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "bip_fast", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_for(path, proc, timeout=300):
    import time

    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


@needs_data
def test_cli_interrupt_and_kill(tmp_path):
    out = tmp_path / "run"
    args = ("pretrain", *QUICK, "--epochs", "3", "--out", out)
    # Ctrl-C before the first checkpoint: one line that says so, no traceback, nothing to resume
    p = _start(*args)
    _wait_for(out / "config.yaml", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and err.count("\n") == 1 and "no epoch had finished" in err, err
    # the same command again (no --force needed), killed hard just after its first checkpoint
    p = _start(*args)
    _wait_for(out / "checkpoint.pt", p)
    p.kill()
    p.communicate(timeout=300)
    assert (out / LOCK_NAME).exists()  # left by the killed run; stale, as nothing holds its flock
    r = cli("pretrain", "--out", out, "--resume")
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs"] == 3
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".*.tmp"))
    # Ctrl-C of a resumed run: the checkpoint is named as kept
    p = _start("pretrain", *QUICK, "--epochs", "3", "--out", tmp_path / "run2")
    _wait_for(tmp_path / "run2" / "checkpoint.pt", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert "Traceback" not in err and err.count("\n") <= 1, err
    if p.returncode == 130:
        assert "checkpoint.pt' from the last finished epoch is kept" in err
