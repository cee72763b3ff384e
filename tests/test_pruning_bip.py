"""BiP (SPEC §3-6) against updates written out by hand: paper/official variants, structures, histogram shortcut."""

import math

import pytest
import torch
import torch.nn.functional as F

from bip_fast.nn import MaskedLinear, masked_modules
from bip_fast.pruning import BiP

from _pruning_helpers import (B2, W1, W2, batches, cls_batches, conv_net, global_topk, img_batches, lin_loss,
                              linear_toy, ref_grads, sgn)


# ----------------------------------------------------------------------------- BiP, paper
def test_bip_alternating_one_step_by_hand():
    lr, slr, mu, wd, gamma, sp = 0.1, 1.0, 0.9, 0.01, 2.0, 0.5
    model = linear_toy()
    alg = BiP(model, sp, lr=lr, score_lr=slr, momentum=mu, weight_decay=wd, gamma=gamma, loss_fn=lin_loss)
    (x1, t1), (x2, t2) = batches(0, 2)
    mods = [m for _, m in masked_modules(model)]
    K = round(0.5 * (12 + 8))
    # Scores start at |θ|; the first mask is the global magnitude mask.
    s0 = [W1.abs(), W2.abs()]
    m0 = global_topk(s0, K)
    for mod, s, mk in zip(mods, s0, m0):
        assert torch.equal(mod.scores.detach(), s)
        assert torch.equal(mod.mask, mk)
    assert mods[0].ig_scale == 1.0 / gamma
    z1, z2 = m0[0] * W1, m0[1] * W2
    # Lower level on (x1, t1) at (m0, θ0). Linear net: h = x z1ᵀ, out = h z2ᵀ + b, dℓ/dout = t.
    h = x1 @ z1.T
    g2 = t1.T @ h
    g1 = (t1 @ z2).T @ x1
    gb = t1.sum(0)
    W1n = W1 - lr * (m0[0] * g1 + wd * W1)  # first step: b = d
    W2n = W2 - lr * (m0[1] * g2 + wd * W2)
    B2n = B2 - lr * (gb + wd * B2)
    # Upper level on (x2, t2) at (m0, θ1).
    z1, z2 = m0[0] * W1n, m0[1] * W2n
    h = x2 @ z1.T
    u2 = t2.T @ h
    u1 = (t2 @ z2).T @ x2
    G1 = sgn(s0[0]) * (W1n * u1 - (1 / gamma) * m0[0] * u1 * u1)
    G2 = sgn(s0[1]) * (W2n * u2 - (1 / gamma) * m0[1] * u2 * u2)
    s1 = [s0[0] - slr * G1, s0[1] - slr * G2]  # no weight decay on scores by default
    m1 = global_topk(s1, K)

    out = alg.step((x1, t1), (x2, t2))
    assert model.calls == 2  # exactly two forward/backward passes per iteration
    torch.testing.assert_close(mods[0].weight.detach(), W1n)
    torch.testing.assert_close(mods[1].weight.detach(), W2n)
    torch.testing.assert_close(mods[1].bias.detach(), B2n)
    torch.testing.assert_close(mods[0].scores.detach(), s1[0])
    torch.testing.assert_close(mods[1].scores.detach(), s1[1])
    assert torch.equal(mods[0].mask, m1[0]) and torch.equal(mods[1].mask, m1[1])
    assert not all(torch.equal(a, b) for a, b in zip(m0, m1)), "toy should move the mask"
    assert sum(int(m.sum()) for m in m1) == K
    torch.testing.assert_close(out["loss"], lin_loss(F.linear(x1 @ (m0[0] * W1).T, m0[1] * W2, B2), t1))
    assert out["count"].item() == 5
    assert all(p.grad is None for p in model.parameters())


def test_bip_alternating_two_steps_momentum():
    """Second iteration uses the momentum buffers b = μ·b + d (both levels)."""
    lr, slr, mu, wd, sp = 0.05, 0.5, 0.9, 1e-3, 0.6
    model = linear_toy(relu=True)
    alg = BiP(model, sp, lr=lr, score_lr=slr, momentum=mu, weight_decay=wd, score_weight_decay=0.01,
              loss_fn=lin_loss)
    bs = batches(1, 4)
    K = round(0.4 * 20)
    P = {"W1": W1.clone(), "W2": W2.clone(), "b2": B2.clone()}
    S = [W1.abs(), W2.abs()]
    M = global_topk(S, K)
    buf = {k: torch.zeros_like(v) for k, v in P.items()}
    sbuf = [torch.zeros_like(s) for s in S]
    for it in range(2):
        lo, up = bs[2 * it], bs[2 * it + 1]
        g = ref_grads(P, M, lo, lin_loss, relu=True)
        grads = {"W1": M[0] * g["g1"], "W2": M[1] * g["g2"], "b2": g["b2"]}
        for k in P:
            buf[k] = mu * buf[k] + grads[k] + wd * P[k]
            P[k] = P[k] - lr * buf[k]
        u = ref_grads(P, M, up, lin_loss, relu=True)
        for i, (w, gg) in enumerate(((P["W1"], u["g1"]), (P["W2"], u["g2"]))):
            G = sgn(S[i]) * (w * gg - 1.0 * M[i] * gg * gg)
            sbuf[i] = mu * sbuf[i] + G + 0.01 * S[i]
            S[i] = S[i] - slr * sbuf[i]
        M = global_topk(S, K)
        alg.step(lo, up)
    mods = [m for _, m in masked_modules(model)]
    torch.testing.assert_close(mods[0].weight.detach(), P["W1"])
    torch.testing.assert_close(mods[1].weight.detach(), P["W2"])
    torch.testing.assert_close(mods[1].bias.detach(), P["b2"])
    torch.testing.assert_close(mods[0].scores.detach(), S[0])
    torch.testing.assert_close(mods[1].scores.detach(), S[1])
    assert torch.equal(mods[0].mask, M[0]) and torch.equal(mods[1].mask, M[1])
    assert model.calls == 4


def test_bip_fused_one_step():
    lr, slr, mu, wd, gamma, sp = 0.1, 1.0, 0.9, 0.01, 1.0, 0.5
    model = linear_toy(relu=True)
    alg = BiP(model, sp, schedule="fused", lr=lr, score_lr=slr, momentum=mu, weight_decay=wd, gamma=gamma,
              loss_fn=lin_loss)
    (x1, t1), (x2, t2) = batches(2, 2)
    K = 10
    S0 = [W1.abs(), W2.abs()]
    M0 = global_topk(S0, K)
    P = {"W1": W1, "W2": W2, "b2": B2}
    g = ref_grads(P, M0, (x1, t1), lin_loss, relu=True)
    # Both gradients at (m0, θ0) from the single pass.
    S1 = [S0[0] - slr * sgn(S0[0]) * (W1 * g["g1"] - M0[0] * g["g1"] ** 2),
          S0[1] - slr * sgn(S0[1]) * (W2 * g["g2"] - M0[1] * g["g2"] ** 2)]
    alg.step((x1, t1), (x2, t2))
    assert model.calls == 1
    mods = [m for _, m in masked_modules(model)]
    torch.testing.assert_close(mods[0].weight.detach(), W1 - lr * (M0[0] * g["g1"] + wd * W1))
    torch.testing.assert_close(mods[1].weight.detach(), W2 - lr * (M0[1] * g["g2"] + wd * W2))
    torch.testing.assert_close(mods[1].bias.detach(), B2 - lr * (g["b2"] + wd * B2))
    torch.testing.assert_close(mods[0].scores.detach(), S1[0])
    torch.testing.assert_close(mods[1].scores.detach(), S1[1])
    M1 = global_topk(S1, K)
    assert torch.equal(mods[0].mask, M1[0]) and torch.equal(mods[1].mask, M1[1])


# ----------------------------------------------------------------------------- BiP, official
def _official_reference(bs, lr, mu, wd, lr2, K, iters):
    """Literal emulation of the authors' loop (SPEC §6): parameters in model order, each layer's
    weight and score slots sharing one storage, two SGD optimisers over all slots, zeroed (not
    freed) gradients, the score slot skipped by optimiser 1 in the first iteration."""
    P = {"W1": W1.clone(), "W2": W2.clone(), "b2": B2.clone(),
         "bn_w": torch.tensor([1.1, 0.9, 1.2, 0.8]), "bn_b": torch.tensor([0.05, -0.05, 0.1, 0.0])}
    # model.parameters() order: W1, S1 (layer 0), bn_w, bn_b, W2, b2, S2 (last layer).
    slots = [("W1", "w"), ("W1", "s"), ("bn_w", "x"), ("bn_b", "x"), ("W2", "w"), ("b2", "x"), ("W2", "s")]
    bufs = [{i: None for i in range(len(slots))} for _ in range(2)]

    def sgd(opt, i, key, grad):
        d = grad + wd * P[key]
        b = bufs[opt][i]
        b = d.clone() if b is None else mu * b + d
        bufs[opt][i] = b
        P[key] = P[key] - lr * b

    masks_seen = []
    for it in range(iters):
        lo, up = bs[2 * it], bs[2 * it + 1]
        M = global_topk([P["W1"], P["W2"]], K)
        masks_seen.append(M)
        g = ref_grads(P, M, lo, F.cross_entropy, bn=True, relu=True)
        lower = {("W1", "w"): M[0] * g["g1"], ("W2", "w"): M[1] * g["g2"], ("b2", "x"): g["b2"],
                 ("bn_w", "x"): g["bn_w"], ("bn_b", "x"): g["bn_b"]}
        for i, (key, kind) in enumerate(slots):
            if kind == "s":
                if it > 0:
                    sgd(0, i, key, torch.zeros_like(P[key]))
            else:
                sgd(0, i, key, lower[(key, kind)])
        M = global_topk([P["W1"], P["W2"]], K)
        masks_seen.append(M)
        u = ref_grads(P, M, up, F.cross_entropy, bn=True, relu=True)
        G = {"W1": torch.sign(P["W1"]) * P["W1"] * u["g1"], "W2": torch.sign(P["W2"]) * P["W2"] * u["g2"]}
        for i, (key, kind) in enumerate(slots):
            if kind == "s":
                sgd(1, i, key, G[key] - lr2 * G[key] ** 2)
            elif key.startswith("bn"):
                sgd(1, i, key, u[key] - lr2 * u[key] ** 2)
            else:  # weight slots and the (frozen) linear bias: zeroed gradient
                sgd(1, i, key, torch.zeros_like(P[key]))
    return P, global_topk([P["W1"], P["W2"]], K)


def test_bip_official_matches_authors_update():
    lr, mu, wd, lr2, sp = 0.1, 0.9, 1e-2, 0.05, 0.55
    bs = cls_batches(3, 6)
    K = round(0.45 * 20)
    P, M = _official_reference(bs, lr, mu, wd, lr2, K, iters=3)
    model = linear_toy(bn=True, relu=True)
    alg = BiP(model, sp, variant="official", lr=lr, score_lr=123.0, momentum=mu, weight_decay=wd, lr2=lr2)
    mods = [m for _, m in masked_modules(model)]
    assert torch.equal(mods[0].mask, global_topk([W1, W2], K)[0])
    for it in range(3):
        alg.step(bs[2 * it], bs[2 * it + 1])
    assert model.calls == 6  # two forward/backward per iteration
    net = model.net
    torch.testing.assert_close(net[0].weight.detach(), P["W1"])
    torch.testing.assert_close(net[-1].weight.detach(), P["W2"])
    torch.testing.assert_close(net[-1].bias.detach(), P["b2"])
    torch.testing.assert_close(net[1].weight.detach(), P["bn_w"])
    torch.testing.assert_close(net[1].bias.detach(), P["bn_b"])
    assert torch.equal(mods[0].mask, M[0]) and torch.equal(mods[1].mask, M[1])
    assert sum(int(m.sum()) for m in M) == K


# ----------------------------------------------------------------------------- structures
@pytest.mark.parametrize("structure,include,counts", [
    ("layer", None, [6, 4]), ("filter", "*", [6, 4]), ("channel", "*", [8, 4]),
    ("filter", None, [6, 8]), ("channel", None, [8, 8]),  # the output layer stays dense unless included
])
def test_bip_structures(structure, include, counts):
    model = linear_toy(relu=True)
    alg = BiP(model, 0.5, structure=structure, loss_fn=lin_loss, include=include)
    alg.step(*batches(9, 2))
    mods = [m for _, m in masked_modules(model)]
    assert [int(m.mask.sum()) for m in mods] == counts
    if structure == "filter":
        assert all(bool((m.mask.all(1) | (~m.mask).all(1)).all()) for m in mods)
    if structure == "channel":
        assert all(bool((m.mask.all(0) | (~m.mask).all(0)).all()) for m in mods)


def test_bip_nm():
    model = linear_toy()
    alg = BiP(model, 0.5, structure="nm", n=2, m=4, include=["net.1"], loss_fn=lin_loss)
    assert [n for n, _ in masked_modules(model)] == ["net.1"]
    alg.step(*batches(12, 2))
    m2 = masked_modules(model)[0][1].mask
    assert torch.equal(m2.sum(1), torch.tensor([2, 2]))
    assert not isinstance(model.net[0], MaskedLinear)
    with pytest.raises(ValueError, match="sparsity"):
        BiP(linear_toy(), 0.9, structure="nm", n=2, m=4)


@pytest.mark.parametrize("variant,schedule", [("paper", "alternating"), ("paper", "fused"), ("official", "alternating")])
def test_histogram_shortcut_matches_plain_projection(variant, schedule):
    """The global projection from fused_sgd_'s histogram equals masks.project of the scores."""
    bs = img_batches(13, 6)
    runs = []
    for use_hist in (True, False):
        alg = BiP(conv_net(), 0.8, variant=variant, schedule=schedule, lr=0.05, score_lr=0.5)
        alg._hist = use_hist
        for i in range(3):
            alg.step(bs[2 * i], bs[2 * i + 1])
        runs.append(alg)
    N = sum(m.numel() for m in runs[0].masks())
    for a, b in zip(runs[0].masks(), runs[1].masks()):
        assert torch.equal(a, b)
    assert sum(int(m.sum()) for m in runs[0].masks()) == math.floor(0.2 * N + 0.5)
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)
