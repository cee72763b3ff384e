"""BiP's filter-wise projection against the authors' rule, on the same scores.

The authors' filter masks (OPTML-Group/BiP, models/layers.py, read for the rule only): per layer, a
filter's score is the L2 norm of |scores| over the filter's entries; the filters are sorted by it
and the int((1 - density) x F) lowest are removed; every layer at the same ratio; the classifier
keeps all its rows. bip_fast keeps max(1, round(density x F)) filters (SPEC §2), so the two rules
choose the same filters whenever they keep the same number; where they keep different numbers the
kept set of one is the top of the other's (same order). Both facts are checked here bit for bit,
and the layers where the counts differ are listed by hand for ResNet-8 and ResNet-20.
"""

import math

import pytest
import torch

import bip_fast
from bip_fast.models import CifarResNet
from bip_fast.ops import keep_count


def authors_filter_mask(scores: torch.Tensor, density: float, keep: int = None) -> torch.Tensor:
    """The authors' rule on one weight's scores, written out independently of bip_fast.masks:
    L2 norm of |scores| per output filter, ascending sort, the lowest int((1 - density) x F) set
    to 0 (or the lowest F - ``keep`` when ``keep`` is given)."""
    f = scores.shape[0]
    norms = torch.norm(scores.abs().flatten(1), p=2, dim=1)
    order = torch.argsort(norms, stable=True)
    j = int((1 - density) * f) if keep is None else f - keep
    rows = torch.ones(f, dtype=torch.bool)
    rows[order[:j]] = False
    return rows.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, bip_fast.nn.MaskedConv2d)]


@pytest.mark.parametrize("depth", [8, 20])
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_projection_matches_the_authors_rule_on_the_same_scores(depth, sparsity):
    torch.manual_seed(depth)
    scores = [torch.randn(m.weight.shape) for m in _convs(bip_fast.sparsify(CifarResNet(depth)))]
    ours = bip_fast.masks.project(scores, 1.0 - sparsity, "filter")
    d = 1.0 - sparsity
    for s, m in zip(scores, ours):
        k = max(1, keep_count(s.shape[0], d))
        # the same filters, ranked the same way, at bip_fast's count: bit for bit
        assert torch.equal(m, authors_filter_mask(s, d, keep=k))
        # at the authors' own count the sets nest: one is the top of the other
        theirs = authors_filter_mask(s, d)
        small, big = (m, theirs) if m.sum() <= theirs.sum() else (theirs, m)
        assert not (small & ~big).any()


def test_where_the_counts_differ():
    # int((1 - d) F) removed (the authors) against max(1, round(d F)) kept (bip_fast), F in {16, 32, 64}
    def authors_keep(f, d):
        return f - int((1 - d) * f)

    differ = {(f, s): (authors_keep(f, 1 - s), max(1, keep_count(f, 1 - s)))
              for f in (16, 32, 64) for s in (0.2, 0.5, 0.8) if authors_keep(f, 1 - s) != max(1, keep_count(f, 1 - s))}
    # worked out by hand: 0.8 x 16 = 12.8 -> the authors remove 12 and keep 4, round(3.2) keeps 3;
    # 0.8 x 32 = 25.6 -> keep 7 against round(6.4) = 6; 0.2 x 64 = 12.8 -> keep 52 against
    # round(51.2) = 51; elsewhere they agree (0.2 x 16 = 3.2 -> 13 and round(12.8) = 13; 0.8 x 64 =
    # 51.2 -> 13 and round(12.8) = 13; 0.5 splits evenly)
    assert differ == {(16, 0.8): (4, 3), (32, 0.8): (7, 6), (64, 0.2): (52, 51)}


def test_bip_filter_masks_follow_the_rule_and_keep_the_classifier_dense():
    torch.manual_seed(0)
    model = CifarResNet(8)
    with pytest.warns(UserWarning, match="dense"):
        alg = bip_fast.BiP(model, 0.8, structure="filter", total_steps=4, score_lr=1.0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        alg.step((x, y), (x, y))
    mods = bip_fast.nn.masked_modules(alg.model)
    for name, m in mods:
        if isinstance(m, torch.nn.Linear):
            assert bool(m.mask.all()), f"{name}: the classifier keeps every row"
            continue
        k = max(1, keep_count(m.weight.shape[0], 0.2))
        assert torch.equal(m.mask.bool(), authors_filter_mask(m.scores.detach(), 0.2, keep=k)), name
    assert math.isclose(sum(float(m.mask.sum()) for _, m in mods if isinstance(m, torch.nn.Conv2d))
                        / sum(m.mask.numel() for _, m in mods if isinstance(m, torch.nn.Conv2d)), 0.2, abs_tol=0.03)
