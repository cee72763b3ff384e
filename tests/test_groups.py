"""structure="group": coupled channel groups from the dependency graph, exact K per group, every
member of a channel masked together (filters, input slices, biases, BatchNorm scale and shift)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import bip_fast
from bip_fast.masks import keep_count
from bip_fast.models import ShortcutA, build
from bip_fast.nn import MaskedBatchNorm2d

from _compact_helpers import group_keep, randomise_norms, tv


class Toy(nn.Module):
    """conv a -> bn_a -> relu -> conv b -> bn_b, added to bn_c(conv c(x)), then fc. Two prunable
    groups: {a out, bn_a, b in} (4 channels) and {b out, bn_b, c out, bn_c, fc in} (3 channels)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 3, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(3)
        self.c = nn.Conv2d(2, 3, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))) + self.bn_c(self.c(x))
        return self.fc(torch.relu(y).mean(dim=(2, 3)))


def _toy():
    torch.manual_seed(0)
    m = Toy()
    bip_fast.attach_groups(m, torch.randn(1, 2, 3, 3))
    return m


def test_toy_groups_and_members():
    m = _toy()
    groups = bip_fast.masks.groups.groups_of(m)
    rows = {tuple(r["members"]): r for r in groups.summary()}
    assert rows[("a", "b", "bn_a")]["channels"] == 4 and rows[("a", "b", "bn_a")]["reason"] is None
    assert rows[("b", "bn_b", "bn_c", "c", "fc")]["channels"] == 3
    fc_group = [r for r in groups.summary() if r["members"] == ["fc"]][0]
    assert fc_group["reason"] is not None and "output" in fc_group["reason"]
    assert isinstance(m.bn_a, MaskedBatchNorm2d) and isinstance(m.bn_c, MaskedBatchNorm2d)


def test_toy_channel_score_is_rms_over_members():
    """Worked by hand: group {a out, b in} has 4 channels of 2 + 3 = 5 entries; scores chosen so
    the sums of squares are ch0: 1+1, ch1: 4+0, ch2: 0+9, ch3: 1+0, RMS² = [0.4, 0.8, 1.8, 0.2]
    -> keep 2 of 4: ch1, ch2. Group {b out, c out, fc in} (fc zero), 4 + 2 + 2 = 8 entries a
    channel: rows of b give 10/3 each, rows of c 2·[0, 25, 1], so RMS² = [3.3, 53.3, 5.3] / 8
    -> keep round(1.5) = 2: ch1, ch2."""
    m = _toy()
    bip_fast.sparsify(m)
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([1.0, 2.0, 0.0, 1.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1) / 2 ** 0.5)
        m.b.weight.copy_(torch.tensor([1.0, 0.0, 3.0, 0.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1) / 3 ** 0.5)
        m.fc.weight.zero_()
        m.c.weight.copy_(torch.tensor([0.0, 5.0, 1.0]).view(3, 1, 1, 1).expand(3, 2, 1, 1))
    bip_fast.OMP(m, 0.5, structure="group")
    assert m.a.mask[:, 0, 0, 0].tolist() == [False, True, True, False]
    assert m.b.mask[1, :, 0, 0].tolist() == [False, True, True, False]
    assert m.bn_a.channel_mask.tolist() == [False, True, True, False]
    assert m.c.mask[:, 0, 0, 0].tolist() == [False, True, True]
    assert m.b.mask[:, 1, 0, 0].tolist() == [False, True, True]
    assert m.bn_b.channel_mask.tolist() == m.bn_c.channel_mask.tolist() == [False, True, True]
    assert m.fc.mask[:, :].all(dim=0).tolist() == [False, True, True]  # fc's input slices follow
    assert m.fc.mask.any(dim=1).all()  # fc's outputs (the model's output) all stay


class PadToy(nn.Module):
    """conv a (2 channels) -> bn_a, padded by a channel-padding shortcut onto the 4 channels of
    conv b -> bn_b, then fc: one group of 4 channels. b's rows 1, 2 also carry a's channels 0, 1
    (a's filter and b's input column: 2 + 4 more entries); b's rows 0, 3 carry b and fc only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(2)
        self.b = nn.Conv2d(2, 4, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(4)
        self.pad = ShortcutA(2, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        y = self.bn_b(self.b(y)) + self.pad(y)
        return self.fc(torch.relu(y).mean(dim=(2, 3)))


def test_channels_in_more_layers_do_not_win_by_count():
    """Worked by hand: every entry 1, except b's rows 0, 3 and fc's columns 0, 3 at 1.2. The
    channels at b rows 1, 2 have 2 + 2 + 2 + 4 = 10 entries of 1 (L2² 10, RMS 1); rows 0, 3 have
    2 + 2 entries of 1.2 (L2² 5.76, RMS 1.2). The L2 norm would keep rows 1, 2 for their count; the
    RMS keeps rows 0, 3, and a's two channels (carried by rows 1, 2) go with rows 1, 2."""
    torch.manual_seed(0)
    m = PadToy()
    bip_fast.attach_groups(m, torch.randn(1, 2, 3, 3))
    assert [g.channels for g in bip_fast.masks.groups.groups_of(m) if g.prunable] == [4]
    bip_fast.sparsify(m)
    with torch.no_grad():
        for mod in (m.a, m.b, m.fc):
            mod.weight.fill_(1.0)
        m.b.weight[[0, 3]] = 1.2
        m.fc.weight[:, [0, 3]] = 1.2
    bip_fast.OMP(m, 0.5, structure="group")
    # Top-2 by RMS is rows 0, 3, which would leave conv a (carried by rows 1, 2) without a channel:
    # the guard swaps the lower of the tied rows 0, 3 (row 0) for a's best channel (row 1, a's 0).
    assert m.bn_b.channel_mask.tolist() == [False, True, False, True]
    assert m.bn_a.channel_mask.tolist() == [True, False]
    assert m.a.mask[0].all() and not m.a.mask[1].any()


def test_every_producing_layer_keeps_a_channel():
    """b's rows 1, 2 (a's channels) score lowest; at any density every producing layer keeps a
    channel and the group keeps exactly its count; where the count (1) is below the number of
    producing layers (2), a warning says so."""
    for density, want in ((0.75, 3), (0.5, 2), (0.25, 1)):
        torch.manual_seed(0)
        m = PadToy()
        bip_fast.attach_groups(m, torch.randn(1, 2, 3, 3))
        bip_fast.sparsify(m)
        with torch.no_grad():
            for mod in (m.a, m.b, m.fc):
                mod.weight.fill_(1.0)
            m.b.weight[[1, 2]] = 0.1
            m.a.weight.fill_(0.1)
            m.fc.weight[:, [1, 2]] = 0.1
        if want == 1:
            with pytest.warns(UserWarning, match="fewer channels than they have producing layers"):
                bip_fast.OMP(m, 1 - density, structure="group")
        else:
            bip_fast.OMP(m, 1 - density, structure="group")
            assert m.bn_a.channel_mask.any()
        assert int(m.bn_b.channel_mask.sum()) == want


def test_ties_go_to_the_lower_channel():
    m = _toy()
    bip_fast.sparsify(m)
    with torch.no_grad():
        for mod in (m.a, m.b, m.c):
            mod.weight.fill_(1.0)
    bip_fast.OMP(m, 0.5, structure="group")
    assert m.bn_a.channel_mask.tolist() == [True, True, False, False]


def _check_exact(model, sparsity):
    groups = bip_fast.masks.groups.groups_of(model)
    rows = group_keep(model, groups)
    assert rows
    for g, keep in rows:
        assert int(keep.sum()) == max(1, keep_count(g.channels, 1.0 - sparsity)), g.members[0].name


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8, 0.99])
@pytest.mark.parametrize("algo", ["bip", "omp", "hydra"])
def test_exact_k_resnet20(algo, sparsity):
    m = randomise_norms(build("resnet20"))
    bip_fast.attach_groups(m, torch.randn(1, 3, 32, 32))
    cls = {"bip": bip_fast.BiP, "omp": bip_fast.OMP, "hydra": bip_fast.Hydra}[algo]
    alg = cls(m, sparsity, structure="group")
    _check_exact(alg.model, sparsity)


def test_exact_k_after_bip_steps_torchvision_resnet18():
    torch.manual_seed(0)
    m = randomise_norms(tv("resnet18", num_classes=10))
    bip_fast.attach_groups(m, torch.randn(1, 3, 32, 32))
    alg = bip_fast.BiP(m, 0.5, structure="group", score_lr=1.0)
    for _ in range(2):
        alg.step((torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))))
        _check_exact(alg.model, 0.5)


def test_needs_attached_groups():
    with pytest.raises(ValueError, match="attach_groups"):
        bip_fast.BiP(build("resnet20"), 0.5, structure="group")


def test_unmasked_member_keeps_its_group_whole():
    m = _toy()
    with pytest.warns(UserWarning, match="not masked"):
        bip_fast.OMP(m, 0.5, structure="group", exclude=["a"])
    assert m.bn_a.channel_mask.all() and m.b.mask[:, :, 0, 0].any(dim=0).all()
    assert int(m.bn_b.channel_mask.sum()) == 2


def test_group_state_round_trip_and_pickle():
    m = randomise_norms(build("resnet20"))
    x = torch.randn(1, 3, 32, 32)
    bip_fast.attach_groups(m, x)
    alg = bip_fast.OMP(m, 0.5, structure="group")
    sd = alg.model.state_dict()
    assert any(k.endswith("channel_mask") for k in sd)
    fresh = build("resnet20")
    bip_fast.attach_groups(fresh, x)
    bip_fast.sparsify(fresh)
    fresh.load_state_dict(sd)
    alg.model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), alg.model(x), rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(alg.model))
    assert len(bip_fast.masks.groups.groups_of(clone)) == len(bip_fast.masks.groups.groups_of(alg.model))
    assert len(bip_fast.masks.groups.groups_of(copy.deepcopy(alg.model))) > 0


def test_plain_state_dict_loads_into_channel_masked_norm():
    bn = nn.BatchNorm2d(4)
    m = MaskedBatchNorm2d(4)
    m.load_state_dict(bn.state_dict())
    assert m.channel_mask.all()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x), bn(x))
    m.set_channel_mask(torch.tensor([True, False, True, True]))
    m.eval()
    assert m(x)[:, 1].abs().max() == 0


def test_existing_structures_unchanged_by_bias_mask():
    """A layer without a bias mask keeps its state-dict keys (the buffer appears only when set)."""
    lin = bip_fast.MaskedLinear(4, 3)
    assert "bias_mask" not in lin.state_dict()
    lin.set_bias_mask(torch.tensor([True, False, True]))
    assert "bias_mask" in lin.state_dict()
    assert lin(torch.zeros(1, 4))[0, 1] == 0
    other = bip_fast.MaskedLinear(4, 3)
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other.bias_mask, lin.bias_mask)


def test_sync_norms_keep_channel_masks():
    """DDP's sync_bn conversion (engine/loop.py) keeps the channel masks of a group-pruned model:
    masked BatchNorm layers become MaskedSyncBatchNorm with the same Parameter and buffer objects,
    and, outside a process group (SyncBatchNorm then normalises locally), compute what the
    MaskedBatchNorm2d computed, in train and eval mode, gradients included."""
    from bip_fast.nn import MaskedSyncBatchNorm, to_sync_norms

    torch.manual_seed(0)
    m = PadToy()
    bip_fast.attach_groups(m, torch.randn(1, 2, 3, 3))
    bip_fast.sparsify(m)
    bip_fast.OMP(m, 0.5, structure="group")
    randomise_norms(m)
    ref = copy.deepcopy(m)
    weight, mask = m.bn_b.weight, m.bn_b.channel_mask
    assert not mask.all()
    out = to_sync_norms(m)
    assert out is m and type(m.bn_b) is MaskedSyncBatchNorm and type(m.bn_a) is MaskedSyncBatchNorm
    assert m.bn_b.weight is weight and m.bn_b.channel_mask is mask
    x = torch.randn(4, 2, 3, 3)
    for train in (True, False):
        m.train(train), ref.train(train)
        y, y_ref = m(x), ref(x)
        assert torch.allclose(y, y_ref, atol=1e-6)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert torch.allclose(m.bn_b.weight.grad, ref.bn_b.weight.grad, atol=1e-6)
        assert (m.bn_b.weight.grad[~mask] == 0).all()
        m.zero_grad(), ref.zero_grad()
    assert torch.equal(m.bn_b.running_mean, ref.bn_b.running_mean)
    # a plain BatchNorm becomes a plain SyncBatchNorm; the plain form bakes the mask in
    plain = to_sync_norms(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    assert type(plain[1]) is nn.SyncBatchNorm
    baked = m.bn_b.to_plain()
    assert type(baked) is nn.SyncBatchNorm and (baked.weight[~mask] == 0).all()


def test_removed_group_channels_get_no_score_gradient():
    """A limitation the docs state (docs/results.md): under group masks a removed channel's producer
    filter, its BatchNorm scale and shift and its consumers' input columns are all masked, so the
    first-order effect of switching the channel on is 0 and every score of it gets exactly zero
    gradient: BiP's group mask changes only where kept channels' scores fall below removed ones."""
    torch.manual_seed(0)
    model = build("resnet20")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    bip_fast.attach_groups(model, x[:2])
    alg = bip_fast.BiP(model, 0.5, structure="group", score_lr=1.0)
    with torch.no_grad():
        for mod in alg.model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.normal_(0.1, 0.1)  # shifts > 0: a kept channel passes its ReLU
    nn.functional.cross_entropy(alg.model.train()(x), y).backward()
    removed = kept_nonzero = 0
    for mod in alg.modules:
        if isinstance(mod, nn.Conv2d):
            off = ~mod.mask.flatten(1).any(dim=1)
            g = mod.scores.grad.flatten(1).abs().sum(dim=1)
            assert torch.all(g[off] == 0)
            removed += int(off.sum())
            kept_nonzero += int((g[~off] > 0).sum())
    assert removed > 0 and kept_nonzero > 0  # there are removed filters, and kept ones do learn
