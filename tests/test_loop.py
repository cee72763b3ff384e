"""Trainer: exact resume (bit-identical to an uninterrupted run), checkpoint contents, --out guard."""
import json

import pytest
import torch
from torch import nn

from bip_fast.files import checkpoint as ckpt
from bip_fast.data import Dataset
from bip_fast.engine.hparams import RunConfig
from bip_fast.engine import Trainer, plan_segments


def tiny_model():
    """A small CNN with BatchNorm (running statistics must resume exactly too)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def synthetic(n_train=96, n_test=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        train_x=torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8),
        train_y=torch.randint(0, 10, (n_train,), generator=g),
        test_x=torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8),
        test_y=torch.randint(0, 10, (n_test,), generator=g),
        num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="synthetic")


def config(out, **kw):
    base = dict(command="prune", out=str(out), arch="resnet20", batch_size=32, test_batch_size=64,
                device="cpu", progress=False, log_interval=1, seed=3)
    base.update(kw)
    return RunConfig.from_flat(base)


class Kill(Exception):
    pass


def killer(after):
    def cb(trainer, record):
        if record["epoch"] == after:
            raise Kill()
    return cb


def final_state(trainer):
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    alg = trainer.alg.state_dict(include_model=False)
    return model, alg


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


CASES = {
    # dense phase (1 epoch) then 2 BiP epochs: a kill at the segment boundary and one mid-BiP
    "bip": dict(method="bip", sparsity=0.8, pretrain_epochs=1, epochs=2),
    # IMP round 0 (2 epochs, rewind at epoch 1) + 2 rounds: kills inside round 0 and between rounds
    "imp": dict(method="imp", sparsity=0.36, epochs=2, rewind_epoch=1),
    # Hydra score phase then finetuning
    "hydra": dict(method="hydra", sparsity=0.7, pretrain_epochs=1, hydra_score_epochs=1, epochs=1),
}


@pytest.mark.parametrize("name,kill_after", [("bip", 1), ("bip", 2), ("imp", 1), ("imp", 4), ("hydra", 2)])
def test_resume_is_bit_identical(tmp_path, name, kill_after):
    ds = synthetic()
    straight = Trainer(config(tmp_path / "a", **CASES[name]), dataset=ds, model_fn=tiny_model)
    rep_a = straight.run()

    first = Trainer(config(tmp_path / "b", **CASES[name]), dataset=ds, model_fn=tiny_model,
                    callbacks=[killer(kill_after)])
    with pytest.raises(Kill):
        first.run()
    saved = ckpt.load(tmp_path / "b" / "checkpoint.pt")
    assert saved["global_epoch"] == kill_after
    resumed = Trainer(config(tmp_path / "b", resume=True), dataset=ds, model_fn=tiny_model)
    rep_b = resumed.run()

    ma, aa = final_state(straight)
    mb, ab = final_state(resumed)
    assert_same(ma, mb, "model")
    assert_same(aa, ab, "algorithm")
    assert rep_a["test_acc"] == rep_b["test_acc"] and rep_a["kept"] == rep_b["kept"]
    ha = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(ha) == strip(hb)
    assert len(ha) == sum(s.epochs for s in straight.segments)


def test_checkpoint_contents_and_outputs(tmp_path):
    ds = synthetic()
    cfg = config(tmp_path / "run", method="bip", sparsity=0.75, pretrain_epochs=1, epochs=1)
    tr = Trainer(cfg, dataset=ds, model_fn=tiny_model)
    rep = tr.run()
    state = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    for key in ("config", "plan", "segment", "epoch", "model", "algorithm", "loaders", "rng", "history",
                "best_acc", "last_acc", "global_epoch"):
        assert key in state, key
    assert [s["kind"] for s in state["plan"]] == ["dense", "bip"]
    assert state["segment"] == 1 and state["epoch"] == 1 and state["global_epoch"] == 2
    assert set(state["loaders"]) == {"lower", "upper"}
    assert set(state["algorithm"]["optimizers"]) == {"weights", "scores"}
    assert state["config"]["prune"]["method"] == "bip"
    assert state["config"]["train"]["lr"] == 0.1  # resolved method default (BiP: the dense rate)
    # the model holds masks with exactly round(0.25 * N) ones
    masks = [v for k, v in state["model"].items() if k.endswith(".mask")]
    n = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == int(0.25 * n + 0.5) == rep["kept"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    for key in ("epoch", "train_loss", "train_acc", "test_acc", "density", "seconds"):
        assert key in rec
    assert rec["density"] == pytest.approx(0.25, abs=1e-4)
    for f in ("model.pt", "masks.pt", "config.yaml", "results.json"):
        assert (tmp_path / "run" / f).is_file(), f


def test_out_guard_refuses_other_run(tmp_path):
    ds = synthetic()
    out = tmp_path / "run"
    Trainer(config(out, command="pretrain", method="dense", epochs=1), dataset=ds, model_fn=tiny_model).run()
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(config(out, command="pretrain", method="dense", epochs=1), dataset=ds, model_fn=tiny_model).run()
    assert (out / "checkpoint.pt").read_bytes() == before
    # --force starts over
    Trainer(config(out, command="pretrain", method="dense", epochs=1, force=True), dataset=ds,
            model_fn=tiny_model).run()
    # resume without checkpoint is an error naming the folder
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        Trainer(config(tmp_path / "empty", resume=True), dataset=ds, model_fn=tiny_model)


def test_resume_rejects_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(config(out, resume=True), dataset=synthetic(), model_fn=tiny_model)
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_plan_segments():
    imp = plan_segments(config("x", method="imp", sparsity=0.9, epochs=5, rewind_epoch=1).resolved())
    assert [s.round for s in imp] == list(range(12))  # round 0 + ceil(log 0.1 / log 0.8) = 11 rounds
    imp_pre = plan_segments(config("x", method="imp", sparsity=0.5, epochs=5, pretrained="p").resolved())
    assert [s.round for s in imp_pre] == [1, 2, 3, 4]
    hyd = plan_segments(config("x", method="hydra", pretrained="p").resolved())
    assert [(s.name, s.epochs) for s in hyd] == [("hydra_prune", 20), ("hydra_finetune", 100)]
    with pytest.raises(ValueError, match="rewind_epoch"):
        plan_segments(config("x", method="imp", sparsity=0.5, epochs=2, rewind_epoch=3).resolved())
