"""Pruning algorithms on toy models, against updates written out by hand (SPEC §3-6).

Expected values come from explicit formulas (SGD: d = g + wd·p; b = μ·b + d; p −= lr·b) and, for
the gradients of the small reference networks, from plain PyTorch autograd on a functional copy
of the model — never from bip_fast code.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bip_fast.nn import MaskedLinear, masked_modules
from bip_fast.pruning import ALGORITHMS, IMP, OMP, BiP, Dense, Hydra, cosine_factor, get_algorithm

# ----------------------------------------------------------------------------- toy models
W1 = torch.tensor([[0.50, -0.10, 0.30], [-0.70, 0.20, 0.05], [0.15, -0.40, 0.90], [0.25, 0.60, -0.35]])
W2 = torch.tensor([[0.80, -0.30, 0.45, -0.12], [-0.55, 0.65, 0.08, 0.33]])
B2 = torch.tensor([0.1, -0.2])


class Counting(nn.Module):
    """Wraps a network and counts forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def linear_toy(bn=False, relu=False):
    """x -> W1 (no bias) [-> BatchNorm1d] [-> ReLU] -> W2 + b2, with the hand-set weights."""
    layers = [nn.Linear(3, 4, bias=False)]
    if bn:
        layers.append(nn.BatchNorm1d(4))
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(4, 2))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[-1].weight.copy_(W2)
        net[-1].bias.copy_(B2)
        if bn:
            net[1].weight.copy_(torch.tensor([1.1, 0.9, 1.2, 0.8]))
            net[1].bias.copy_(torch.tensor([0.05, -0.05, 0.1, 0.0]))
    return Counting(net)


def lin_loss(out, t):
    """Linear loss: dℓ/dout = t, so the gradients of the linear toy have closed forms."""
    return (out * t).sum()


def batches(seed, n, b=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, generator=g), torch.randn(b, 2, generator=g)) for _ in range(n)]


def cls_batches(seed, n, b=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, generator=g), torch.randint(0, 2, (b,), generator=g)) for _ in range(n)]


def global_topk(scores, keep):
    """Reference global top-K of |s|: ties to the earlier tensor, then the lower flat index."""
    flat = torch.cat([s.detach().abs().reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    m = torch.zeros_like(flat, dtype=torch.bool)
    m[order] = True
    out, i = [], 0
    for s in scores:
        out.append(m[i:i + s.numel()].view(s.shape))
        i += s.numel()
    return out


def sgn(s):
    return torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))


def ref_grads(params, masks, batch, loss_fn, bn=False, relu=False):
    """dℓ/dz for z = m⊙θ of both layers, plus grads of b2 and the BN affine parameters (autograd
    on a functional copy of the toy)."""
    x, t = batch
    z1 = (masks[0] * params["W1"]).detach().requires_grad_()
    z2 = (masks[1] * params["W2"]).detach().requires_grad_()
    leaves = [z1, z2]
    b2 = params["b2"].detach().clone().requires_grad_()
    leaves.append(b2)
    h = x @ z1.T
    if bn:
        bw = params["bn_w"].detach().clone().requires_grad_()
        bb = params["bn_b"].detach().clone().requires_grad_()
        leaves += [bw, bb]
        h = F.batch_norm(h, None, None, bw, bb, training=True)
    if relu:
        h = h.relu()
    out = h @ z2.T + b2
    grads = torch.autograd.grad(loss_fn(out, t), leaves)
    names = ["g1", "g2", "b2"] + (["bn_w", "bn_b"] if bn else [])
    return dict(zip(names, grads))


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


# ----------------------------------------------------------------------------- OMP, Hydra, Dense
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


def test_dense_matches_torch_sgd():
    model = linear_toy(relu=True)
    ref = linear_toy(relu=True).net
    alg = Dense(model, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=4)
    assert not masked_modules(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for i, (x, y) in enumerate(cls_batches(7, 3)):
        for gr in opt.param_groups:
            gr["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * i / 4))
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        out = alg.step((x, y))
        assert out["count"].item() == 6 and 0 <= out["correct"].item() <= 6
    for p, q in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach())
    assert alg.sparsity() == 0.0 and alg.masks() == []


def test_cosine_schedule():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0)
    assert cosine_factor(50, 10) == pytest.approx(0.0)
    assert cosine_factor(7, None) == 1.0
    alg = BiP(linear_toy(), 0.5, lr=0.2, score_lr=0.4, total_steps=4, loss_fn=lin_loss)
    alg.step(batches(8, 1)[0])
    assert alg.current_lrs() == pytest.approx({"weights": 0.2 * cosine_factor(1, 4),
                                               "scores": 0.4 * cosine_factor(1, 4)})


# ----------------------------------------------------------------------------- structures
@pytest.mark.parametrize("structure,counts", [("layer", [6, 4]), ("filter", [6, 4]), ("channel", [8, 4])])
def test_bip_structures(structure, counts):
    model = linear_toy(relu=True)
    alg = BiP(model, 0.5, structure=structure, loss_fn=lin_loss)
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


# ----------------------------------------------------------------------------- resume
def _make(kind):
    if kind == "bip":
        return BiP(linear_toy(bn=True, relu=True), 0.5, lr=0.05, score_lr=0.3, total_steps=6)
    if kind == "bip-fused":
        return BiP(linear_toy(bn=True, relu=True), 0.5, schedule="fused", lr=0.05, score_lr=0.3, total_steps=6)
    if kind == "bip-official":
        return BiP(linear_toy(bn=True, relu=True), 0.5, variant="official", lr=0.05, lr2=0.01, total_steps=6)
    if kind == "imp":
        return IMP(linear_toy(bn=True, relu=True), rewind_step=1, lr=0.05, total_steps=6)
    if kind == "omp":
        return OMP(linear_toy(bn=True, relu=True), 0.5, lr=0.05, total_steps=6)
    if kind == "hydra":
        return Hydra(linear_toy(bn=True, relu=True), 0.5, score_lr=0.3, total_steps=6, finetune_steps=3)
    return Dense(linear_toy(bn=True, relu=True), lr=0.05, total_steps=6)


def _run(alg, bs, kind, start, stop):
    for i in range(start, stop):
        if i == 2 and kind == "imp":
            alg.next_round()
        if i == 3 and kind == "hydra":
            alg.finetune()
        alg.step(bs[2 * i], bs[2 * i + 1])


@pytest.mark.parametrize("kind", ["bip", "bip-fused", "bip-official", "imp", "omp", "hydra", "dense"])
def test_state_dict_resume_is_bit_identical(kind):
    bs = cls_batches(10, 10)
    straight = _make(kind)
    _run(straight, bs, kind, 0, 5)
    first = _make(kind)
    _run(first, bs, kind, 0, 3)
    sd = first.state_dict()
    _run(first, bs, kind, 3, 4)  # the saved state must not alias live tensors
    resumed = _make(kind)
    resumed.load_state_dict(sd)
    _run(resumed, bs, kind, 3, 5)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for name, g in straight.param_groups.items():
        for a, b in zip(g.buffers, resumed.param_groups[name].buffers):
            assert torch.equal(a, b), name
    assert straight.global_step == resumed.global_step == 5
    assert straight.step_count == resumed.step_count
    if kind == "imp":
        assert resumed.round == 1
    if kind == "hydra":
        assert resumed.phase == "finetune"


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            BiP(linear_toy(), bad)
        with pytest.raises(ValueError, match="sparsity"):
            OMP(linear_toy(), bad)
        with pytest.raises(ValueError, match="sparsity"):
            Hydra(linear_toy(), bad)
    with pytest.raises(TypeError, match="sparsity"):
        BiP(linear_toy(), "0.9")
    with pytest.raises(ValueError, match="structure"):
        BiP(linear_toy(), 0.5, structure="rows")
    with pytest.raises(ValueError, match="schedule"):
        BiP(linear_toy(), 0.5, schedule="jacobi")
    with pytest.raises(ValueError, match="variant"):
        BiP(linear_toy(), 0.5, variant="authors")
    with pytest.raises(ValueError, match="schedule"):
        BiP(linear_toy(), 0.5, variant="official", schedule="fused")
    with pytest.raises(ValueError, match="score_init"):
        BiP(linear_toy(), 0.5, score_init="random")
    with pytest.raises(ValueError, match="gamma"):
        BiP(linear_toy(), 0.5, gamma=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        BiP(linear_toy(), 0.5, total_steps=0)
    with pytest.raises(ValueError, match="rate"):
        IMP(linear_toy(), rate=1.0)
    with pytest.raises(TypeError, match="model"):
        BiP("resnet", 0.5)
    with pytest.raises(ValueError, match="model"):
        BiP(nn.Sequential(nn.ReLU()), 0.5)
    alg = BiP(linear_toy(), 0.5)
    with pytest.raises(TypeError, match="batch"):
        alg.step(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="batch2"):
        alg.step((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), [1, 2, 3])
    with pytest.raises(ValueError, match="state_dict"):
        alg.load_state_dict(OMP(linear_toy(), 0.5).state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        alg.load_state_dict(BiP(linear_toy(), 0.6).state_dict())


def test_registry():
    assert get_algorithm("bip") is BiP and get_algorithm("IMP") is IMP
    assert set(ALGORITHMS) == {"bip", "imp", "omp", "hydra", "dense", "snip", "grasp", "synflow", "gmp"}
    with pytest.raises(ValueError, match="bip.*dense.*gmp.*grasp.*hydra.*imp.*omp"):
        get_algorithm("lamp")
    with pytest.raises(TypeError, match="name"):
        get_algorithm(3)


def test_metrics_are_tensors_from_the_training_pass():
    model = linear_toy(relu=True)
    alg = BiP(model, 0.5)
    (x, y), up = cls_batches(11, 2)
    mods = [m for _, m in masked_modules(model)]
    with torch.no_grad():
        logits = model.net(x)
    calls = model.calls
    out = alg.step((x, y), up)
    assert model.calls - calls == 2
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y))
    assert out["correct"].item() == int((logits.argmax(1) == y).sum())
    assert isinstance(mods[0], MaskedLinear)


# ----------------------------------------------------------------------------- conv models
def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def img_batches(seed, n, b=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


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


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_a_conv_net(name):
    cls = get_algorithm(name)
    model = conv_net()
    kw = {"ramp_steps": 1, "prune_every": 1} if name == "gmp" else {}
    alg = cls(model) if name in ("imp", "dense") else cls(model, 0.75, **kw)
    bs = img_batches(14, 4)
    if hasattr(alg, "prepare"):  # the saliency baselines cut once from a few batches
        alg.prepare(bs[:1])
    losses = [alg.step(bs[i], bs[i + 1]) for i in (0, 2)]
    assert all(bool(torch.isfinite(o["loss"])) for o in losses)
    if name == "dense":
        assert alg.masks() == [] and alg.sparsity() == 0.0
    elif name == "imp":
        alg.next_round()
        assert alg.sparsity() == pytest.approx(1 - math.floor(0.8 * sum(m.numel() for m in alg.masks()) + 0.5)
                                               / sum(m.numel() for m in alg.masks()))
    else:
        per = [int(m.sum()) for m in alg.masks()]
        if name == "hydra":  # layer-wise
            assert per == [math.floor(0.25 * m.numel() + 0.5) for m in alg.masks()]
        else:
            assert sum(per) == math.floor(0.25 * sum(m.numel() for m in alg.masks()) + 0.5)
