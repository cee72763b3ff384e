"""DDP: two CPU processes (gloo) give identical masks on both ranks and the one-process result
for the same global batch.

The run uses the paper's gamma = 1: the implicit-gradient term -(1/gamma)·m⊙g⊙g is quadratic in
the gradient, so BiP adds it after DDP's all-reduce (from the averaged weight gradient); adding it
per rank would average per-rank squares instead of squaring the global gradient.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bip_fast.data import Dataset
from bip_fast.engine.hparams import RunConfig
from bip_fast.engine.loop import Trainer

WORLD = 2
GLOBAL_BATCH = 32


def tiny_model():
    # No BatchNorm: its per-rank batch statistics would (legitimately) differ from one process.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def synthetic():
    g = torch.Generator().manual_seed(1)
    return Dataset(
        train_x=torch.randint(0, 256, (96, 3, 32, 32), generator=g, dtype=torch.uint8),
        train_y=torch.randint(0, 10, (96,), generator=g),
        test_x=torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8),
        test_y=torch.randint(0, 10, (32,), generator=g),
        num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="synthetic")


def run_bip(out=None):
    cfg = RunConfig.from_flat(dict(
        command="prune", out=out, arch="resnet20", method="bip", sparsity=0.8, gamma=1.0,
        pretrain_epochs=1, epochs=2, batch_size=GLOBAL_BATCH, device="cpu", progress=False, seed=5))
    tr = Trainer(cfg, dataset=synthetic(), model_fn=tiny_model)
    rep = tr.run()
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, rep, tr


def _worker(rank, init_file, out_dir, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state, rep, tr = run_bip(out_dir)
        assert tr.world == WORLD and tr.rank == rank
        torch.save({"state": state, "rep": rep}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_match_one_process(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "ddp_run"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out), str(results)), nprocs=WORLD, join=True)
    r0 = torch.load(results / "rank0.pt")
    r1 = torch.load(results / "rank1.pt")

    masks = [k for k in r0["state"] if k.endswith(".mask")]
    assert masks, "the model should be masked"
    for k in masks:  # identical masks on every rank
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # only rank 0 wrote the run folder
    assert (out / "checkpoint.pt").is_file() and (out / "model.pt").is_file()

    single, rep, _ = run_bip(None)
    kept = sum(int(single[k].sum()) for k in masks)
    assert kept == sum(int(r0["state"][k].sum()) for k in masks) == rep["kept"]
    for k in masks:
        assert torch.equal(single[k], r0["state"][k]), k
    for k, v in single.items():
        if v.is_floating_point():
            torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert r0["rep"]["test_acc"] == pytest.approx(rep["test_acc"], abs=1.0 / 32 + 1e-9)
