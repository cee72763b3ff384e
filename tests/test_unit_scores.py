"""BiP(unit_scores=True): one shared score per filter (channel). The first mask is the per-weight
scores' mask; every update moves a unit's score by the mean of its weights' score gradients, so
the entries of a unit stay equal; bad values refused; checkpoints keep the option."""

import warnings

import pytest
import torch
from torch import nn

from bip_fast.pruning import BiP


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _bip(structure, unit, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier kept dense
        return BiP(_net(), 0.5, structure=structure, score_lr=1.0, unit_scores=unit, **kw)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _unit_view(s, structure):
    """(units, entries) of a scores tensor: rows are filters (dim 0) or channels (dim 1)."""
    return s.flatten(1) if structure == "filter" else s.transpose(0, 1).flatten(1)


@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_first_mask_is_the_per_weight_mask_and_units_stay_equal(structure):
    plain, unit = _bip(structure, False), _bip(structure, True)
    for a, b in zip(plain.modules, unit.modules):
        assert torch.equal(a.mask, b.mask)  # the RMS keeps each unit's L2 norm
        u = _unit_view(b.scores, structure)
        assert torch.equal(u, u[:, :1].expand_as(u))
        assert torch.allclose(u.norm(dim=1), _unit_view(a.scores, structure).norm(dim=1), rtol=1e-5)
    start = [m.scores.detach().clone() for m in unit.modules]
    for i in range(3):
        unit.step(_batch(i))
    for s0, mod in zip(start, unit.modules):
        u = _unit_view(mod.scores, structure)
        assert torch.equal(u, u[:, :1].expand_as(u))
        assert not torch.equal(mod.scores, s0)  # the updates moved them: the test exercises them


@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_update_is_the_unit_mean_of_the_per_weight_update(structure):
    """From the same unit-equal scores, one step with shared scores moves each score by the unit
    mean of what per-weight scores move (momentum buffers start at 0, no score weight decay)."""
    unit, plain = _bip(structure, True), _bip(structure, False)
    with torch.no_grad():
        for a, b in zip(plain.modules, unit.modules):
            a.scores.copy_(b.scores)
    plain._project(plain._scores())
    before = [m.scores.detach().clone() for m in unit.modules]
    batch = _batch()
    plain.step(batch)
    unit.step(batch)
    for s0, a, b in zip(before, plain.modules, unit.modules):
        d_plain = _unit_view(a.scores - s0, structure)
        d_unit = _unit_view(b.scores - s0, structure)
        assert d_plain.abs().max() > 0
        want = d_plain.mean(dim=1, keepdim=True).expand_as(d_plain)
        assert torch.allclose(d_unit, want, rtol=1e-4, atol=1e-7)


def test_bad_values_and_checkpoints():
    with pytest.raises(TypeError, match="unit_scores"):
        BiP(_net(), 0.5, score_lr=1.0, unit_scores=1)
    with pytest.raises(ValueError, match="unit_scores"):
        BiP(_net(), 0.5, score_lr=1.0, unit_scores=True)  # global: a weight is its own unit
    with pytest.raises(ValueError, match="unit_scores"):
        BiP(_net(), 0.5, structure="filter", score_lr=1.0, unit_scores=True, variant="official")
    a = _bip("filter", True)
    with pytest.raises(ValueError, match="unit_scores"):
        _bip("filter", False).load_state_dict(a.state_dict())
    b = _bip("filter", True)
    b.load_state_dict(a.state_dict())
    old = _bip("filter", False).state_dict()
    old.pop("unit_scores")  # made before the option: it meant False
    _bip("filter", False).load_state_dict(old)


def test_remove_hooks_restores_per_weight_gradients():
    alg = _bip("filter", True)
    alg.remove_hooks()
    alg.model.train()(_batch()[0]).sum().backward()
    g = alg.modules[0].scores.grad.flatten(1)
    assert not torch.equal(g, g[:, :1].expand_as(g))


def test_cli_flag():
    from test_bn_correction import plan_and_algorithm
    from test_loop import config

    plan, alg = plan_and_algorithm(structure="filter", unit_scores=True)
    assert "one score per filter" in plan
    assert alg.unit_scores and alg._units is not None
    with pytest.raises(ValueError, match="unit_scores"):
        config("x", method="bip", unit_scores=True).resolved()  # global structure
    with pytest.raises(ValueError, match="unit_scores"):
        config("x", method="omp", structure="filter", unit_scores=True).resolved()


def test_data_parallel_ig_term_is_averaged_per_unit_too():
    """Under data parallelism the implicit-gradient term is added after the all-reduce, after the
    hooks ran; it is averaged over each unit as well."""
    alg = _bip("filter", True)
    alg._ig_after_reduce = 1.0  # as with world size > 1
    alg.model.train()(_batch()[0]).sum().backward()
    alg._add_ig_after_reduce()
    for mod in alg.modules:
        g = mod.scores.grad.flatten(1)
        assert torch.allclose(g, g.mean(dim=1, keepdim=True).expand_as(g), rtol=1e-5, atol=1e-8)
    assert any(mod.weight.grad.abs().max() > 0 for mod in alg.modules)
