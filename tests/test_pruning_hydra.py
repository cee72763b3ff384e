"""Hydra on toy models: score-phase updates written out by hand, fine-tuning, layer-wise default."""

import math

import pytest
import torch
import torch.nn.functional as F

from bip_fast.nn import masked_modules
from bip_fast.pruning import Hydra

from _pruning_helpers import B2, W1, W2, cls_batches, global_topk, linear_toy, ref_grads, sgn


# ----------------------------------------------------------------------------- Hydra
def test_hydra_score_phase_leaves_weights_untouched():
    model = linear_toy(bn=True, relu=True)
    alg = Hydra(model, 0.5, structure="global", score_lr=0.5, momentum=0.9, score_weight_decay=0.0)
    mods = [m for _, m in masked_modules(model)]
    # Hydra's scaled init: sqrt(6/fan_in)·|θ|/max|θ| per layer.
    torch.testing.assert_close(mods[0].scores.detach(), math.sqrt(6 / 3) * W1.abs() / W1.abs().max())
    torch.testing.assert_close(mods[1].scores.detach(), math.sqrt(6 / 4) * W2.abs() / W2.abs().max())
    assert all(m.ig_scale == 0.0 for m in mods)
    before = {k: v.clone() for k, v in model.named_parameters()}
    S0 = [m.scores.detach().clone() for m in mods]
    M0 = global_topk(S0, 10)
    bs = cls_batches(6, 3)
    P = {"W1": W1, "W2": W2, "b2": B2, "bn_w": model.net[1].weight.detach(), "bn_b": model.net[1].bias.detach()}
    g = ref_grads(P, M0, bs[0], F.cross_entropy, bn=True, relu=True)
    S1 = [S0[0] - 0.5 * sgn(S0[0]) * W1 * g["g1"], S0[1] - 0.5 * sgn(S0[1]) * W2 * g["g2"]]
    alg.step(bs[0])
    torch.testing.assert_close(mods[0].scores.detach(), S1[0])
    torch.testing.assert_close(mods[1].scores.detach(), S1[1])
    alg.step(bs[1])
    for k, v in model.named_parameters():
        if not k.endswith("scores"):
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(m.scores, s) for m, s in zip(mods, S0))
    assert sum(int(m.mask.sum()) for m in mods) == 10
    masks = [m.mask.clone() for m in mods]
    scores = [m.scores.detach().clone() for m in mods]
    alg.finetune()
    assert alg.phase == "finetune" and alg.step_count == 0
    alg.step(bs[2])
    assert not torch.equal(mods[0].weight, before["net.0.weight"])
    assert all(torch.equal(m.mask, mk) for m, mk in zip(mods, masks))
    assert all(torch.equal(m.scores, s) for m, s in zip(mods, scores))
    with pytest.raises(RuntimeError):
        alg.finetune()


def test_hydra_default_is_layerwise():
    model = linear_toy()
    Hydra(model, 0.5)
    mods = [m for _, m in masked_modules(model)]
    assert [int(m.mask.sum()) for m in mods] == [6, 4]
