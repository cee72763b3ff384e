"""Short runs on a real CIFAR-10 subset: BiP hits the exact budget and beats a random mask of the
same sparsity trained for the same budget; IMP follows the geometric series 0.8^r."""
import os

import pytest
import torch
from torch import nn

import bip_fast
from bip_fast import data
from bip_fast.engine.hparams import RunConfig
from bip_fast.engine.loop import Trainer

DATA = os.environ.get("BIP_FAST_TEST_DATA",
                      os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))
HAVE_DATA = os.path.isfile(os.path.join(DATA, "cifar-10-batches-py", "test_batch")) or \
    os.path.isfile(os.path.join(DATA, "test_batch"))
pytestmark = pytest.mark.skipif(not HAVE_DATA, reason=f"CIFAR-10 not found at {DATA} (set BIP_FAST_TEST_DATA)")


def small_cnn():
    """A width-reduced VGG-style CNN (about 100k weights): learns CIFAR in a few CPU epochs."""
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def cfg(out, **kw):
    base = dict(out=str(out), arch="resnet20", data_dir=DATA, batch_size=64, test_batch_size=500,
                device="cpu", progress=False, seed=0)
    base.update(kw)
    return RunConfig.from_flat(base)


@pytest.fixture(scope="module")
def cifar():
    return data.load_dataset("cifar10", DATA, subset=(1200, 600), seed=0)


@pytest.fixture(scope="module")
def pretrained(cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "dense"
    rep = Trainer(cfg(out, command="pretrain", method="dense", epochs=3, lr=0.05), dataset=cifar,
                  model_fn=small_cnn).run()
    assert rep["test_acc"] > 0.2, rep  # it learned something (chance is 0.1)
    return out


def test_bip_exact_budget_and_beats_random_mask(cifar, pretrained, tmp_path):
    epochs = 2
    bip = Trainer(cfg(tmp_path / "bip", command="prune", method="bip", sparsity=0.9, epochs=epochs,
                      pretrained=str(pretrained)), dataset=cifar, model_fn=small_cnn)
    rep = bip.run()
    n = rep["prunable"]
    assert rep["kept"] == int(0.1 * n + 0.5)  # round(0.1 * N) (no .5 tie for this N)
    masks = [m.mask for _, m in bip_fast.masked_modules(bip.model)]
    assert sum(int(m.sum()) for m in masks) == int(0.1 * n + 0.5)

    # Random mask with exactly the same number of weights, same pretrained start, same epochs,
    # same weight learning rate / decay as BiP's lower level, weights trained under the fixed mask.
    model = small_cnn()
    model.load_state_dict(torch.load(pretrained / "model.pt"))
    model = bip_fast.sparsify(model)
    mods = [m for _, m in bip_fast.masked_modules(model)]
    total = sum(m.mask.numel() for m in mods)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=torch.Generator().manual_seed(0))[: int(0.1 * n + 0.5)]] = True
    off = 0
    for m in mods:
        m.set_mask(keep[off: off + m.mask.numel()].view_as(m.mask))
        off += m.mask.numel()
    rand_path = tmp_path / "random_mask.pt"
    torch.save(model.state_dict(), rand_path)
    rnd = Trainer(cfg(tmp_path / "rand", command="finetune", method="dense", checkpoint=str(rand_path),
                      epochs=epochs, lr=0.01, weight_decay=1e-4), dataset=cifar, model_fn=small_cnn)
    rep_r = rnd.run()
    assert rep_r["kept"] == rep["kept"]
    assert rep["test_acc"] > rep_r["test_acc"], (rep["test_acc"], rep_r["test_acc"])


def test_imp_geometric_series(cifar, pretrained, tmp_path):
    # the densities of the series, not the rewind point, are under test here (the 3-epoch dense run
    # keeps no epoch-3 rewind weights): rewind to the pretrained weights
    tr = Trainer(cfg(tmp_path / "imp", command="prune", method="imp", sparsity=0.36, epochs=1,
                     pretrained=str(pretrained), rewind_to_pretrained=True), dataset=cifar, model_fn=small_cnn)
    rep = tr.run()
    rounds = rep["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]  # ceil(log 0.64 / log 0.8) = 2
    n = rep["prunable"]
    kept = n
    for r in rounds:
        kept = int(0.8 * kept + 0.5)  # 20% of the remaining weights per round
        assert r["density"] == pytest.approx(kept / n, abs=1e-12)
        assert r["density"] == pytest.approx(0.8 ** r["round"], abs=1e-4)
        saved = torch.load(tmp_path / "imp" / f"round_{r['round']:02d}.pt", weights_only=False)
        assert sum(int(v.sum()) for k, v in saved["model"].items() if k.endswith(".mask")) == kept
    assert rep["kept"] == kept
