"""masks.pt holds every mask of a run (weights, biases, BatchNorm channels) and ``load_masks``
puts them all back: the plain architecture, the run's weights and masks.pt compute exactly what
the run's model computes, for every structure; ``eval`` and ``export`` read the same masks."""
import copy
import json

import pytest
import torch
from torch import nn

import bip_fast
from bip_fast.cli import main
from bip_fast.engine.rundir import load_state_into
from bip_fast.files.checkpoint import save_atomic
from bip_fast.masks import load_masks, save_masks
from bip_fast.models import build
from bip_fast.nn import MaskedBatchNorm2d

from _compact_helpers import randomise_norms
from test_cli import DATA, QUICK, dense_run, needs_data  # noqa: F401  (dense_run: a fixture)


class BiasToy(nn.Module):
    """conv a (bias) -> bn_a -> conv b (bias) -> fc: group {a out, bn_a, b in} and {b out, fc in}."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.b(torch.relu(self.bn_a(self.a(x))))
        return self.fc(torch.relu(y).mean(dim=(2, 3)))


def _pruned_toy():
    torch.manual_seed(0)
    m = BiasToy()
    bip_fast.attach_groups(m, torch.randn(1, 2, 3, 3))
    alg = bip_fast.OMP(m, 0.5, structure="group")
    randomise_norms(alg.model)
    return alg.model.eval()


def _plain_weights(state_dict, arch_model):
    """The entries of ``state_dict`` that the plain architecture has (weights, biases, BatchNorm
    parameters and statistics; no scores, no masks): the README's way to take a run's weights."""
    keys = arch_model.state_dict().keys()
    return {k: v for k, v in state_dict.items() if k in keys}


def test_every_mask_round_trips_onto_a_plain_model(tmp_path):
    model = _pruned_toy()
    assert not model.bn_a.channel_mask.all() and not model.a.bias_mask.all() and not model.b.bias_mask.all()
    save_masks(model, tmp_path / "masks.pt")
    saved = torch.load(tmp_path / "masks.pt")
    assert saved["format"] == "bip_fast.masks/2"
    assert sorted(saved["bias_masks"]) == ["a", "b"] and sorted(saved["channel_masks"]) == ["bn_a"]

    fresh = bip_fast.sparsify(BiasToy())  # a fresh model, as a user builds it
    fresh.load_state_dict(_plain_weights(model.state_dict(), BiasToy()))
    assert load_masks(fresh, tmp_path / "masks.pt") is fresh
    assert isinstance(fresh.bn_a, MaskedBatchNorm2d)
    _assert_same_model(fresh, model)  # every mask, every weight, bit for bit
    x = torch.randn(5, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
        # a removed channel outputs exactly 0 (what compact() needs to cut it out); with the weight
        # masks alone, as masks.pt used to hold, its bias and BatchNorm shift got through
        gone = ~model.bn_a.channel_mask
        assert fresh.bn_a(fresh.a(x))[:, gone].abs().max() == 0
        partial = bip_fast.sparsify(BiasToy()).eval()
        partial.load_state_dict(_plain_weights(model.state_dict(), BiasToy()))
        for (_, a), (_, b) in zip(bip_fast.masked_modules(partial), bip_fast.masked_modules(model)):
            a.set_mask(b.mask)
        assert partial.bn_a(partial.a(x))[:, gone].abs().max() > 0


def _assert_same_model(model, ref):
    """The same state dict (keys and values) but the scores, which no mask file holds."""
    a, b = ({k: v for k, v in m.state_dict().items() if not k.endswith("scores")} for m in (model, ref))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:4]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:4]


def test_mismatched_files_are_refused_before_anything_changes(tmp_path):
    model = _pruned_toy()
    save_masks(model, tmp_path / "masks.pt")
    # a model with one more masked bias (loaded from another run) than the file names
    other = copy.deepcopy(model)
    other.fc.set_bias_mask(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"bias masks .* missing \['fc'\]"):
        load_masks(other, tmp_path / "masks.pt")
    # a model sparsified differently: a layer left dense
    fresh = bip_fast.sparsify(BiasToy(), exclude="fc")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"weight masks .* unexpected \['fc'\]"):
        load_masks(fresh, tmp_path / "masks.pt")
    after = fresh.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], v) for k, v in after.items())
    # a mask of the wrong shape
    obj = torch.load(tmp_path / "masks.pt")
    obj["channel_masks"]["bn_a"] = torch.ones(3, dtype=torch.bool)
    save_atomic(obj, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"channel masks\['bn_a'\].*shape \(4,\)"):
        load_masks(bip_fast.sparsify(BiasToy()), tmp_path / "bad.pt")


def test_weight_only_files_still_load(tmp_path):
    model = _pruned_toy()
    save_atomic({"format": "bip_fast.masks/1", "masks": {n: m.mask for n, m in bip_fast.masked_modules(model)}},
                tmp_path / "old.pt")
    fresh = load_masks(bip_fast.sparsify(BiasToy()), tmp_path / "old.pt")
    for (_, a), (_, b) in zip(bip_fast.masked_modules(fresh), bip_fast.masked_modules(model)):
        assert torch.equal(a.mask, b.mask)
    assert not isinstance(fresh.bn_a, MaskedBatchNorm2d)


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@needs_data
@pytest.mark.parametrize("structure", ["global", "filter", "channel", "group"])
def test_run_masks_reload_exactly(dense_run, tmp_path, capsys, structure):  # noqa: F811
    """A prune run's masks.pt on the plain architecture with the run's weights is the run's model,
    bit for bit (the way the README shows); eval counts those masks, export writes them again
    and its dense-format model computes the same."""
    run, exp = tmp_path / "run", tmp_path / "export"
    _run(capsys, "prune", *QUICK, "--method", "bip", "--structure", structure, "--sparsity", "0.5",
         "--pretrained", dense_run, "--out", run)
    sd = torch.load(run / "model.pt")
    saved = torch.load(run / "masks.pt")
    assert (structure == "group") == bool(saved["channel_masks"])
    assert structure != "group" or not all(bool(v.all()) for v in saved["channel_masks"].values())

    ref = load_state_into(build("resnet20"), sd, "checkpoint", run / "model.pt").eval()  # as eval/export read it
    model = bip_fast.sparsify(build("resnet20"))  # as the README shows
    model.load_state_dict(_plain_weights(sd, build("resnet20")))  # the run's weights
    model = load_masks(model, run / "masks.pt").eval()
    _assert_same_model(model, ref)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = ref(x)
        assert float((model(x) - y).abs().max()) == 0.0

    ev = _run(capsys, "eval", "--checkpoint", run, "--data-dir", DATA, "--subset", "64", "50", "--device", "cpu")
    assert ev["kept"] == sum(int(m.sum()) for m in saved["masks"].values())
    _run(capsys, "export", "--checkpoint", run, "--out", exp)
    again = torch.load(exp / "masks.pt")
    for key in ("masks", "bias_masks", "channel_masks"):
        assert again[key].keys() == saved[key].keys()
        assert all(torch.equal(again[key][k], v) for k, v in saved[key].items()), key
    plain = build("resnet20").eval()
    plain.load_state_dict(torch.load(exp / "model_dense_format.pt"))
    with torch.no_grad():
        assert float((plain(x) - y).abs().max()) == 0.0
