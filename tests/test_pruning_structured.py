"""Filter and group pruning of IMP (IMP-F) and OMP (OMP-F, L1-norm filter pruning).

Expected masks are worked out by hand from toy weights whose filters rank differently under the
L1 and the L2 norm; ResNet-20 checks the exact channel counts of the coupled groups over rounds.
"""

import pytest
import torch
from torch import nn

import bip_fast
from bip_fast.masks import project
from bip_fast.models import build
from bip_fast.nn import masked_modules
from bip_fast.pruning import IMP, OMP

# Five filters of 4 inputs; norms (L2 / L1): r0 1.0 / 1.0, r1 0.8 / 1.6, r2 0.849 / 1.2,
# r3 0.3 / 0.3, r4 0.866 / 1.5. Descending L2: r0 r4 r2 r1 r3; descending L1: r1 r4 r2 r0 r3.
ROWS = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                     [0.4, 0.4, 0.4, 0.4],
                     [0.6, 0.6, 0.0, 0.0],
                     [0.3, 0.0, 0.0, 0.0],
                     [0.5, 0.5, 0.5, 0.0]])
# Two output filters: a = (0.9, 0, 0, 0, 0) (L2 0.9, L1 0.9), b = 0.3 everywhere (L2 0.671, L1 1.5).
OUT = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.0], [0.3] * 5])


def filter_toy():
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.copy_(ROWS)
        net[2].weight.copy_(OUT)
        net[2].bias.zero_()
    return net


def group_toy():
    """Linear -> BatchNorm -> ReLU -> Linear: the 5 hidden channels are one group (filters of the
    first layer, BatchNorm entries, columns of the second). Columns all 0.2, so a channel's RMS is
    sqrt((‖row‖² + 2·0.04) / 6) and its mean magnitude (‖row‖₁ + 0.4) / 6: the rows' orders."""
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.copy_(ROWS)
        net[3].weight.fill_(0.2)
    bip_fast.attach_groups(net, torch.randn(2, 4))
    return net


def kept_filters(mask: torch.Tensor) -> list:
    return mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- IMP-F
@pytest.mark.parametrize("norm, rounds, out", [
    ("l2", [[0, 2, 4], [0, 4], [0], [0]], [0]),
    ("l1", [[1, 2, 4], [1, 4], [1], [1]], [1]),
])
@pytest.mark.parametrize("include", [None, "*"])
def test_imp_filter_rounds_by_hand(norm, rounds, out, include):
    # rate 0.4: 5 filters -> round(3) = 3 -> round(1.8) = 2 -> round(1.2) = 1 -> max(1, round(0.6)) = 1;
    # the 2 output filters stay (the model's output), unless include selects the layer: then
    # round(1.2) = 1. No training: every round sees the rewound weights.
    alg = IMP(filter_toy(), rate=0.4, structure="filter", filter_norm=norm, include=include)
    mods = [m for _, m in masked_modules(alg.model)]
    for want in rounds:
        alg.next_round()
        assert kept_filters(mods[0].mask) == want
        assert kept_filters(mods[1].mask) == (out if include else [0, 1])
        assert bool(mods[0].mask[want].all())  # whole filters
        torch.testing.assert_close(mods[0].weight.detach(), ROWS)  # rewound, pruned filters included


def test_imp_filter_keeps_pruned_filters_pruned_when_their_weights_grow():
    alg = IMP(filter_toy(), rate=0.4, structure="filter")
    alg.next_round()  # keeps r0, r2, r4
    mods = [m for _, m in masked_modules(alg.model)]
    with torch.no_grad():  # a pruned filter's (masked, unused) weights become the largest
        mods[0].weight[3].fill_(10.0)
        mods[0].weight[1].fill_(5.0)
        alg._rewind["0.weight"][3].fill_(10.0)
    alg.next_round()
    assert kept_filters(mods[0].mask) == [0, 4]


def test_imp_rate_per_round():
    alg = IMP(filter_toy(), rate=0.2, structure="filter")
    mods = [m for _, m in masked_modules(alg.model)]
    alg.next_round(rate=0.6)  # 5 -> round(2) = 2
    assert kept_filters(mods[0].mask) == [0, 4]
    alg.next_round()  # rate 0.2: 2 -> round(1.6) = 2
    assert kept_filters(mods[0].mask) == [0, 4]
    with pytest.raises(ValueError, match="rate"):
        alg.next_round(rate=1.0)


@pytest.mark.parametrize("norm, rounds", [("l2", [[0, 2, 4], [0, 4], [0]]), ("l1", [[1, 2, 4], [1, 4], [1]])])
def test_imp_group_rounds_by_hand(norm, rounds):
    alg = IMP(group_toy(), rate=0.4, structure="group", filter_norm=norm)
    first, second = [m for _, m in masked_modules(alg.model)]
    bn = alg.model[1]
    for want in rounds:
        alg.next_round()
        assert kept_filters(first.mask) == want
        assert kept_filters(second.mask.t()) == want  # the input columns of the same channels
        assert bn.channel_mask.nonzero().flatten().tolist() == want  # the rewind leaves channel masks alone
        assert bool(second.mask.any(dim=1).all())  # the output layer's filters are the model's output: kept


def test_imp_group_resnet20_exact_counts_and_compact():
    torch.manual_seed(0)
    model = build("resnet20")
    x = torch.randn(2, 3, 32, 32)
    groups = bip_fast.attach_groups(model, x)
    alg = IMP(model, rate=0.2, structure="group")
    names = dict(masked_modules(alg.model))

    def kept(g):
        """The group's channels that its producers still output; every producer agrees (a padding
        shortcut merges stages: a producer carries only its stage's share of the channels)."""
        alive = {}
        for m in (m for m in g.members if m.kind == "out"):
            mask = names[m.name].mask
            alive[m.name] = (set(m.channel.tolist()), set(m.channel[mask.transpose(0, m.dim).reshape(
                mask.shape[m.dim], -1).any(dim=1)[m.index]].tolist()))
        union = set().union(*(a for _, a in alive.values()))
        assert all(a == union & carried for carried, a in alive.values())
        return union

    prunable = [g for g in groups if g.prunable]
    assert sorted({g.channels for g in prunable}) == [16, 32, 64]
    before = {i: set(range(g.channels)) for i, g in enumerate(prunable)}
    # 16 -> 13 -> 10, 32 -> 26 -> 21, 64 -> 51 -> 41 (round halves up, of the remaining channels)
    for want in ({16: 13, 32: 26, 64: 51}, {16: 10, 32: 21, 64: 41}):
        alg.next_round()
        for i, g in enumerate(prunable):
            now = kept(g)
            assert len(now) == want[g.channels]
            assert now <= before[i]  # removed channels stay removed
            before[i] = now
    alg.model.eval()
    small = bip_fast.compact(alg.model, x)  # checks masked == compacted itself
    assert not any(isinstance(m, type(names["conv1"])) for m in small.modules())


def test_imp_structure_checks_and_resume():
    with pytest.raises(ValueError, match="structure"):
        IMP(filter_toy(), structure="layer")
    with pytest.raises(ValueError, match="filter_norm"):
        IMP(filter_toy(), filter_norm="l1")  # the global structure ranks single weights
    a = IMP(filter_toy(), rate=0.4, structure="filter", filter_norm="l1")
    a.next_round()
    sd = a.state_dict()
    b = IMP(filter_toy(), rate=0.4, structure="filter", filter_norm="l1")
    b.load_state_dict(sd)
    b.next_round()
    a.next_round()
    assert all(torch.equal(x, y) for x, y in zip(a.masks(), b.masks()))
    with pytest.raises(ValueError, match="structure"):
        IMP(filter_toy(), rate=0.4).load_state_dict(sd)


# ----------------------------------------------------------------------------- OMP-F / L1-norm
@pytest.mark.parametrize("norm, want, out", [("l2", [0, 4], [0]), ("l1", [1, 4], [1])])
@pytest.mark.parametrize("include", [None, "*"])
def test_omp_filter_norm_by_hand(norm, want, out, include):
    # sparsity 0.6: 5 filters keep round(2) = 2; the 2 output filters stay (the model's output),
    # unless include selects the layer: then round(0.8) = 1
    alg = OMP(filter_toy(), 0.6, structure="filter", filter_norm=norm, include=include)
    first, second = [m for _, m in masked_modules(alg.model)]
    assert kept_filters(first.mask) == want
    assert kept_filters(second.mask) == (out if include else [0, 1])


@pytest.mark.parametrize("norm, want", [("l2", [0, 4]), ("l1", [1, 4])])
def test_omp_group_norm_by_hand(norm, want):
    alg = OMP(group_toy(), 0.6, structure="group", filter_norm=norm)
    assert alg.model[1].channel_mask.nonzero().flatten().tolist() == want


def test_l1_filter_pruning_matches_li_et_al_per_layer():
    """Li et al. (2017): per layer, drop the filters with the smallest sum of |weights|."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 3))
    ref = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    alg = OMP(net, 0.5, structure="filter", filter_norm="l1", exclude=["5"])
    for w, (_, mod) in zip(ref, masked_modules(alg.model)):
        l1 = w.abs().sum(dim=(1, 2, 3))
        keep = sorted(torch.argsort(l1, descending=True)[: round(0.5 * w.shape[0])].tolist())
        assert kept_filters(mod.mask) == keep
    with pytest.raises(ValueError, match="filter_norm"):
        OMP(filter_toy(), 0.5, filter_norm="l1")
    with pytest.raises(ValueError, match="filter_norm"):
        OMP(filter_toy(), 0.5, structure="filter", filter_norm="l3")


def test_project_within_counts_the_remaining_filters():
    s = ROWS.clone()
    within = torch.ones(5, 4, dtype=torch.bool)
    within[0] = False  # r0 already pruned: 4 remain, density 0.5 keeps 2 of them
    within[2, 3] = False  # a partly masked filter still counts as remaining
    mask = project([s], 0.5, "filter", within=[within])[0]
    assert kept_filters(mask) == [2, 4]  # L2 among r1..r4: r4 0.866, r2 0.849
    assert not bool((mask & ~within).any())
    with pytest.raises(ValueError, match="within"):
        project([s], 0.5, "global", within=[within])
