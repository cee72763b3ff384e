"""Structured projections (SPEC §2) and mask files."""

import pytest
import torch

import bip_fast
from bip_fast import masks
from bip_fast.ops import reference as ref


def _scores():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, 3, 3, generator=g), torch.randn(10, 8, generator=g)]


def test_global_and_layer_counts():
    s = _scores()
    n = sum(t.numel() for t in s)
    ms = masks.project(s, 0.1, "global")
    assert sum(int(m.sum()) for m in ms) == masks.keep_count(n, 0.1)
    for m, w in zip(ms, ref.topk_masks_ref(s, masks.keep_count(n, 0.1))):
        assert torch.equal(m, w)
    ms = masks.project(s, 0.3, "layer")
    for m, t in zip(ms, s):
        assert int(m.sum()) == masks.keep_count(t.numel(), 0.3)
        assert torch.equal(m, ref.topk_masks_ref([t], masks.keep_count(t.numel(), 0.3))[0])


def test_filter_and_channel_by_hand():
    s = torch.zeros(4, 3, 2, 2)
    s[0] = 1.0  # filter norms: 4, 0, 6, 2 -> keep filters 2, 0 at density 0.5
    s[2] = 1.5
    s[3, 0] = 1.0
    m = masks.project([s], 0.5, "filter")[0]
    assert m[0].all() and m[2].all() and not m[1].any() and not m[3].any()
    c = torch.zeros(2, 4, 3)
    c[:, 1] = 2.0  # channel norms: 0, big, 0, small -> keep channels 1 and 3 at density 0.5
    c[0, 3] = 0.5
    m = masks.project([c], 0.5, "channel")[0]
    assert m[:, 1].all() and m[:, 3].all() and not m[:, 0].any() and not m[:, 2].any()


def test_nm_two_four():
    s = torch.tensor([[4.0, -1.0, 3.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
    m = masks.project([s], 0.5, "nm", n=2, m=4)[0]
    # group 1: 4 and 3 win; group 2: all equal, lower index wins
    assert m.tolist() == [[True, False, True, False, True, True, False, False]]
    conv = torch.randn(4, 2, 3, 3)  # K = 18 is not a multiple of 4
    with pytest.raises(ValueError, match="multiple"):
        masks.project([conv], 0.5, "nm")


def test_bad_density_and_structure():
    s = _scores()
    with pytest.raises(ValueError, match="density"):
        masks.project(s, 0.0)
    with pytest.raises(ValueError, match="density"):
        masks.project(s, 1.2)
    with pytest.raises(ValueError, match="structure"):
        masks.project(s, 0.5, "rows")


def test_apply_save_load_masks(tmp_path):
    model = bip_fast.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    mods = [m for _, m in bip_fast.masked_modules(model)]
    ms = masks.project([m.scores for m in mods], 0.5)
    masks.apply_masks(mods, ms)
    masks.save_masks(model, tmp_path / "m.pt")
    other = bip_fast.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    masks.load_masks(other, tmp_path / "m.pt")
    for (_, a), (_, b) in zip(bip_fast.masked_modules(model), bip_fast.masked_modules(other)):
        assert torch.equal(a.mask, b.mask)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        masks.load_masks(other, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="masks"):
        masks.apply_masks(mods, ms[:1])


def test_kept_units_filters_channels_and_errors():
    m = torch.zeros(4, 3, 2, 2)
    m[1, 0, 0, 0] = 1  # one entry keeps filter 1 (and input channel 0)
    m[3, 2] = 1
    assert masks.kept_units(m).tolist() == [False, True, False, True]
    assert masks.kept_units(m, dim=1).tolist() == [True, False, True]
    assert masks.kept_units(m.bool()).tolist() == [False, True, False, True]
    assert masks.kept_units(torch.tensor([0.0, 2.0, 0.0])).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="mask"):
        masks.kept_units(torch.tensor(1.0))
