"""IMP and OMP on toy models: magnitude masks, rounds and rewinding against values worked out by hand."""

import math

import pytest
import torch

from bip_fast.nn import masked_modules
from bip_fast.pruning import IMP, OMP

from _pruning_helpers import B2, W1, W2, batches, global_topk, lin_loss, linear_toy, ref_grads


# ----------------------------------------------------------------------------- IMP
def test_imp_round_prunes_20_percent_and_rewinds():
    model = linear_toy(relu=True)
    alg = IMP(model, rewind_step=1, lr=0.1, momentum=0.9, weight_decay=1e-3, total_steps=10, loss_fn=lin_loss)
    mods = [m for _, m in masked_modules(model)]
    assert alg.round == 0 and alg.sparsity() == 0.0
    bs = batches(4, 6)
    alg.step(bs[0])
    rewind = {k: v.clone() for k, v in model.state_dict().items()}  # state after 1 step
    alg.step(bs[1])
    alg.step(bs[2])
    trained = [m.weight.detach().clone() for m in mods]
    with pytest.raises(RuntimeError):
        IMP(linear_toy(), rewind_step=5).next_round()
    alg.next_round()
    assert alg.round == 1 and alg.step_count == 0
    keep = math.floor(0.8 * 20 + 0.5)  # 16
    expect = global_topk(trained, keep)
    assert sum(int(m.mask.sum()) for m in mods) == keep
    for m, e in zip(mods, expect):
        assert torch.equal(m.mask, e)
    for k, v in model.state_dict().items():
        if not (k.endswith("mask") or k.endswith("scores")):
            assert torch.equal(v, rewind[k]), k
    assert all(torch.count_nonzero(b) == 0 for b in alg.param_groups["weights"].buffers)
    # Round 2 prunes among the remaining weights only: a pruned weight made huge stays pruned.
    pruned = (~mods[0].mask).nonzero()[0].tolist()
    with torch.no_grad():
        mods[0].weight[tuple(pruned)] = 100.0
    before = [m.mask.clone() for m in mods]
    alg.next_round()
    keep2 = math.floor(0.8 * 16 + 0.5)  # 13
    assert sum(int(m.mask.sum()) for m in mods) == keep2
    assert not mods[0].mask[tuple(pruned)]
    assert all(bool((~b & m.mask).sum() == 0) for b, m in zip(before, mods))
    cand = [torch.where(b, mm.weight.detach().abs(), torch.zeros_like(mm.weight)) for b, mm in zip(before, mods)]
    # no zeros among the candidates here, so the masked zero-entries never tie with survivors
    assert all(bool((c[b] > 0).all()) for c, b in zip(cand, before))
    exp2 = global_topk(cand, keep2)
    assert all(torch.equal(m.mask, e) for m, e in zip(mods, exp2))


def test_imp_rounds_for():
    assert IMP.rounds_for(1.0) == 0
    assert IMP.rounds_for(0.8) == 1
    assert IMP.rounds_for(0.64) == 2
    assert IMP.rounds_for(0.512) == 3
    assert IMP.rounds_for(0.41) == 4
    assert IMP.rounds_for(0.1074) == 10
    assert IMP.rounds_for(0.8 ** 21) == 21
    assert IMP.rounds_for(0.0092) == 22  # strict formula: 0.8**21 = 0.00922 > 0.0092
    assert IMP.rounds_for(0.5) == 4
    with pytest.raises(ValueError, match="density"):
        IMP.rounds_for(0.0)


# ----------------------------------------------------------------------------- OMP
def test_omp_global_magnitude_mask_and_retraining():
    model = linear_toy()
    alg = OMP(model, 0.7, lr=0.1, momentum=0.0, weight_decay=0.0, loss_fn=lin_loss)
    mods = [m for _, m in masked_modules(model)]
    K = 6
    expect = global_topk([W1, W2], K)
    flat = torch.cat([W1.abs().flatten(), W2.abs().flatten()])
    thr = flat.sort(descending=True).values[K - 1]
    for m, e, w in zip(mods, expect, (W1, W2)):
        assert torch.equal(m.mask, e)
        assert torch.equal(m.mask, w.abs() >= thr)
    assert abs(alg.sparsity() - 0.7) < 1e-12
    x, t = batches(5, 1)[0]
    g = ref_grads({"W1": W1, "W2": W2, "b2": B2}, expect, (x, t), lin_loss)
    alg.step((x, t))
    torch.testing.assert_close(mods[0].weight.detach(), W1 - 0.1 * expect[0] * g["g1"])
    torch.testing.assert_close(mods[1].weight.detach(), W2 - 0.1 * expect[1] * g["g2"])
    assert all(torch.equal(m.mask, e) for m, e in zip(mods, expect))
