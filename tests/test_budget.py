"""structure="group" with a budget: ``macs=`` / ``params=`` keep at most a fraction of the dense
model's MACs / parameters, channels chosen by one ranking of score mass per unit of cost across all
coupled groups (bip_fast/masks/budget.py). Toy values worked by hand; real models compacted and
counted with the MAC counter of bip_fast.compact (count_macs) on the input given to attach_groups."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bip_fast
from bip_fast.compaction import count_macs
from bip_fast.masks.budget import Budget, costs_of, selection_cost
from bip_fast.masks.groups import groups_of, project_groups
from bip_fast.models import build

from _compact_helpers import group_keep, plain_params, randomise_norms, tv
from test_groups import PadToy


class TwoRes(nn.Module):
    """conv a (1 -> 2, 1x1) on 4x4 -> bn_a -> relu -> 2x2 average pool -> conv b (2 -> 2, 1x1) on
    2x2 -> bn_b -> relu -> mean -> fc (2 -> 1). Groups: A = {a out, bn_a, b in}, B = {b out, bn_b,
    fc in}, 2 channels each. MACs (input 1x1x4x4): a 16·2·1 = 32, b 4·2·2 = 16, fc 1·1·2 = 2; 50.
    A channel of A costs a's filter (16) + b's input slice (4 per kept b output); one of B costs b's
    filter (4 per kept b input) + fc's input (1): B's channels are the cheap ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(2)
        self.b = nn.Conv2d(2, 2, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        y = F.avg_pool2d(torch.relu(self.bn_a(self.a(x))), 2)
        return self.fc(torch.relu(self.bn_b(self.b(y))).mean(dim=(2, 3)))


X_TOY = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def _toy(weights=None):
    torch.manual_seed(0)
    m = randomise_norms(TwoRes())
    bip_fast.attach_groups(m, X_TOY)
    bip_fast.sparsify(m)
    with torch.no_grad():
        for mod in (m.a, m.b, m.fc):
            mod.weight.fill_(1.0)
        if weights:
            weights(m)
    return m


def _compacted_equal(masked, x):
    small = bip_fast.compact(masked, x)  # checks the outputs itself; and once more here
    masked.eval()
    small.eval()
    with torch.no_grad():
        a, b = masked(x), small(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    return small


def test_toy_cost_model_matches_the_counter():
    m = _toy()
    costs = costs_of(m)
    assert costs.macs == 50 == count_macs(m, X_TOY)
    assert costs.params == plain_params(m) == 2 + 4 + 4 + 4 + 3


def test_toy_ties_go_to_the_cheaper_channel():
    """All weights 1: every channel's score mass is 3 (A: a's 1 entry + b's column of 2; B: b's row
    of 2 + fc's 1). Forced: a and b keep their channel 0 (ties to the lower index): 16 + 4 + 1 = 21
    MACs. Budget 0.6 (30): B's channel 1 (+4 + 1 = 26) fits, A's channel 1 (+16 + 4) does not."""
    m = _toy()
    bip_fast.OMP(m, macs=0.6, structure="group")
    assert m.bn_a.channel_mask.tolist() == [True, False]
    assert m.bn_b.channel_mask.tolist() == [True, True]
    rep = bip_fast.sparsity_report(m)["budget"]
    assert rep["kind"] == "macs" and rep["target"] == 0.6 and rep["macs"] == pytest.approx(26 / 50)
    # parameters kept: a 1, bn_a 2, b 1x2, bn_b 4, fc 2 + 1 -> 12 of 17
    assert rep["params"] == pytest.approx(12 / 17)
    small = _compacted_equal(m, X_TOY)
    assert count_macs(small, X_TOY) == 26 and sum(p.numel() for p in small.parameters()) == 12


def test_toy_a_high_score_outweighs_the_cost():
    """B's channel 1 nearly zero (b's row 1 and fc's column 1 at 0.1: mass 0.03, ratio ~0.005);
    A's channel 1 keeps mass 1 + 1 + 0.01 (ratio ~0.1) and wins despite costing 20 MACs:
    21 + 20 = 41 <= 42 (0.85 of 50); then B's channel 1 would make 50."""
    def w(m):
        m.b.weight[1] = 0.1
        m.fc.weight[:, 1] = 0.1

    m = _toy(w)
    bip_fast.OMP(m, macs=0.85, structure="group")
    assert m.bn_a.channel_mask.tolist() == [True, True]
    assert m.bn_b.channel_mask.tolist() == [True, False]
    assert bip_fast.sparsity_report(m)["budget"]["macs"] == pytest.approx(41 / 50)
    assert count_macs(_compacted_equal(m, X_TOY), X_TOY) == 41


def test_toy_budget_below_the_smallest_connected_model():
    """Budget 0.1 (5 MACs) is below one channel per producing layer (21): that is kept, with a warning."""
    m = _toy()
    with pytest.warns(UserWarning, match="below the smallest connected model"):
        bip_fast.OMP(m, macs=0.1, structure="group")
    assert m.bn_a.channel_mask.tolist() == [True, False] and m.bn_b.channel_mask.tolist() == [True, False]
    assert bip_fast.sparsity_report(m)["budget"]["macs"] == pytest.approx(21 / 50)


def test_every_producing_layer_keeps_a_channel_under_a_tiny_budget():
    """PadToy: one merged group of 4 channels produced by conv a (2 of them, through the padding
    shortcut) and conv b (all 4). a's channels score lowest, so a ranking alone would drop them;
    the guard keeps a's best channel and b's best channel."""
    torch.manual_seed(0)
    m = PadToy()
    x = torch.randn(1, 2, 3, 3)
    bip_fast.attach_groups(m, x)
    bip_fast.sparsify(m)
    with torch.no_grad():
        for mod in (m.a, m.b, m.fc):
            mod.weight.fill_(1.0)
        m.a.weight.fill_(0.1)
        m.b.weight[[1, 2]] = 0.1
        m.fc.weight[:, [1, 2]] = 0.1
    with pytest.warns(UserWarning, match="below the smallest connected model"):
        bip_fast.OMP(m, params=0.05, structure="group")
    assert m.bn_a.channel_mask.any() and m.a.mask.any()
    assert m.bn_b.channel_mask.tolist() == [True, True, False, False]  # b's best (0), a's best (row 1)
    _compacted_equal(m, x)


def test_same_scores_same_mask_and_never_over_budget():
    """The projection is a function of the scores (twice the same mask), its exact cost is within
    the budget, and the budget is missed by less than the dearest single channel it could still add."""
    m = randomise_norms(build("resnet20"))
    bip_fast.attach_groups(m, torch.randn(1, 3, 32, 32))
    alg = bip_fast.OMP(m, macs=0.4, structure="group")
    first = [mk.clone() for mk in alg.masks()]
    scores = [mod.weight.detach() for mod in alg.modules]
    masks, _ = project_groups(alg.model, alg.module_names, scores, 1.0, budget=Budget("macs", 0.4))
    assert all(torch.equal(a, b) for a, b in zip(first, masks))
    groups, costs = groups_of(alg.model), costs_of(alg.model)
    rows = group_keep(alg.model, groups)
    active = [i for i, g in enumerate(groups.groups) if g.prunable]
    keep = torch.cat([k for _, k in rows])
    limit = math.floor(0.4 * costs.macs)
    cost = int(selection_cost(groups, costs, active, keep, "macs"))
    assert cost <= limit
    extra = []
    for c in torch.nonzero(~keep).flatten().tolist():
        more = keep.clone()
        more[c] = True
        extra.append(int(selection_cost(groups, costs, active, more, "macs")) - cost)
    assert limit - cost < max(extra)
    assert bip_fast.sparsity_report(alg.model)["budget"]["macs"] == pytest.approx(cost / costs.macs)


def test_torchvision_resnet18_bip_half_the_macs():
    """The issue's target: BiP(model, macs=0.5, structure="group"), one step, compact: MACs within 2%
    of half the dense model's (never above), the same outputs, and the closed-form count is the counter's."""
    torch.manual_seed(0)
    m = randomise_norms(tv("resnet18", num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    bip_fast.attach_groups(m, x)
    dense, plain = count_macs(m, x), copy.deepcopy(m)
    alg = bip_fast.BiP(m, macs=0.5, structure="group", score_lr=1.0)
    alg.step((torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))))
    small = _compacted_equal(alg.model, x)
    macs = count_macs(small, x)
    assert 0.5 * dense * 0.98 <= macs <= 0.5 * dense
    assert bip_fast.sparsity_report(alg.model)["budget"]["macs"] == pytest.approx(macs / dense, abs=1e-12)
    tp = pytest.importorskip("torch_pruning")  # its counter also counts BatchNorm, pooling, ...: within 2% too
    ratio = tp.utils.count_ops_and_params(small, x)[0] / tp.utils.count_ops_and_params(plain, x)[0]
    assert abs(ratio - 0.5) <= 0.01


@pytest.mark.parametrize("algo", ["omp", "hydra", "bip"])
def test_cifar_resnet_half_the_parameters(algo):
    """params=0.5 on resnet20 (padding shortcuts: merged groups): the compacted model holds at most
    half the dense parameters, within 2%."""
    torch.manual_seed(0)
    m = randomise_norms(build("resnet20"))
    x = torch.randn(1, 3, 32, 32)
    bip_fast.attach_groups(m, x)
    dense = plain_params(m)
    cls = {"omp": bip_fast.OMP, "hydra": bip_fast.Hydra, "bip": bip_fast.BiP}[algo]
    alg = cls(m, params=0.5, structure="group")
    if algo != "omp":
        alg.step((torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))))
    small = _compacted_equal(alg.model, x)
    params = sum(p.numel() for p in small.parameters())
    assert 0.5 * dense * 0.98 <= params <= 0.5 * dense
    assert bip_fast.sparsity_report(alg.model)["budget"]["params"] == pytest.approx(params / dense, abs=1e-12)


def test_imp_rounds_land_on_the_budget():
    """IMP(macs=0.5, rate=0.2): rounds_for(0.5) = 4 rounds with budgets 0.8, 0.64, 0.512, 0.5; a
    removed channel stays removed; a fifth round raises."""
    torch.manual_seed(0)
    m = randomise_norms(build("resnet20"))
    x = torch.randn(1, 3, 32, 32)
    bip_fast.attach_groups(m, x)
    alg = bip_fast.IMP(m, macs=0.5, structure="group")
    assert alg.target_rounds == 4
    before = [mk.clone() for mk in alg.masks()]
    for want in (0.8, 0.64, 0.512, 0.5):
        alg.next_round()
        landed = bip_fast.sparsity_report(alg.model)["budget"]["macs"]
        assert want * 0.98 <= landed <= want
        assert all(not bool((mk & ~old).any()) for mk, old in zip(alg.masks(), before))
        before = [mk.clone() for mk in alg.masks()]
    assert 0.49 <= count_macs(_compacted_equal(alg.model, x), x) / count_macs(m, x) <= 0.5
    with pytest.raises(RuntimeError, match="budget macs=0.5"):
        alg.next_round()


def test_budget_in_the_state_dict():
    m = _toy()
    alg = bip_fast.BiP(copy.deepcopy(m), macs=0.6, structure="group")
    sd = alg.state_dict()
    assert sd["budget"] == "macs=0.6"
    bip_fast.BiP(copy.deepcopy(m), macs=0.6, structure="group").load_state_dict(sd)
    with pytest.raises(ValueError, match="budget"):
        bip_fast.BiP(copy.deepcopy(m), macs=0.5, structure="group").load_state_dict(sd)


@pytest.mark.parametrize("kw,err,match", [
    (dict(), ValueError, "exactly one target"),
    (dict(sparsity=0.5, macs=0.5), ValueError, "exactly one target"),
    (dict(macs=0.5, params=0.5), ValueError, "exactly one target"),
    (dict(macs=0.0), ValueError, r"in \(0, 1\]"),
    (dict(macs=1.5), ValueError, r"in \(0, 1\]"),
    (dict(params=float("nan")), ValueError, r"in \(0, 1\]"),
    (dict(macs="0.5"), TypeError, "expected a float"),
    (dict(macs=0.5, structure="global"), ValueError, "structure='group'"),
    (dict(params=0.5, structure="filter"), ValueError, "structure='group'"),
])
@pytest.mark.parametrize("algo", ["bip", "omp", "hydra"])
def test_invalid_targets(algo, kw, err, match):
    kw = dict(kw)
    kw.setdefault("structure", "group")
    cls = {"bip": bip_fast.BiP, "omp": bip_fast.OMP, "hydra": bip_fast.Hydra}[algo]
    with pytest.raises(err, match=match):
        cls(_toy(), **kw)


def test_invalid_imp_targets():
    with pytest.raises(ValueError, match="at most one target"):
        bip_fast.IMP(_toy(), sparsity=0.5, macs=0.5, structure="group")
    with pytest.raises(ValueError, match="structure='group'"):
        bip_fast.IMP(_toy(), macs=0.5)


def test_budget_needs_the_costs_of_attach_groups():
    m = _toy()
    delattr(m, "_bip_fast_layer_costs")
    with pytest.raises(ValueError, match="attach_groups"):
        bip_fast.OMP(m, macs=0.5, structure="group")


def test_cli_flags_plan_line_and_algorithm():
    """--macs / --params: validated with the other flags, shown in the plan line, passed to the
    algorithm (engine.setup.build_algorithm)."""
    from bip_fast.engine import plan_segments
    from bip_fast.engine.plan import describe_plan
    from bip_fast.engine.setup import build_algorithm
    from test_loop import config

    cfg = config("x", method="bip", pretrained="p", epochs=1, structure="group", macs=0.5, score_lr=1.0).resolved()
    segs = plan_segments(cfg)
    assert "| budget --macs 0.5 (at most 0.5 of the dense model's MACs (on the data's input size), channels " \
           "ranked across all groups by score per MAC; --sparsity unused) |" in describe_plan(cfg, segs, 2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alg = build_algorithm(segs[-1], cfg, build("resnet20"), 2, lambda mod: mod)
    assert alg.budget == Budget("macs", 0.5) and alg.sparsity_target is None
    assert 0.49 <= bip_fast.sparsity_report(alg.model)["budget"]["macs"] <= 0.5
    imp = config("x", method="imp", pretrained="p", epochs=1, structure="group", params=0.5).resolved()
    assert "params budget after each round 0.8, 0.64, 0.512, 0.5" in describe_plan(imp, plan_segments(imp), 2)
    for kw, match in ((dict(method="bip", macs=0.5), "--structure group"),
                      (dict(method="snip", structure="group", macs=0.5), "--structure group"),
                      (dict(method="bip", structure="group", params=1.5), r"in \(0, 1\]"),
                      (dict(method="bip", structure="group", macs=0.5, params=0.5), "one budget"),
                      (dict(method="imp", structure="group", macs=0.5, rounds=2), "drop --rounds")):
        with pytest.raises(ValueError, match=match):
            config("x", **kw).resolved()


def test_report_follows_the_last_projection_also_through_a_forward_proxy():
    """The engine may route the algorithm's model through a proxy (engine.setup.Forward): the
    budget entry still lands on the plain model; a later projection without a budget drops it."""
    from bip_fast.engine.setup import Forward

    m = _toy()
    alg = bip_fast.BiP(m, macs=0.6, structure="group", score_lr=0.1)
    setattr(m, "_bip_fast_budget", None)
    alg.model = Forward(m, m)
    alg._project(alg._scores())
    assert bip_fast.sparsity_report(m)["budget"]["macs"] == pytest.approx(26 / 50)
    bip_fast.OMP(m, 0.5, structure="group")
    assert "budget" not in bip_fast.sparsity_report(m)
