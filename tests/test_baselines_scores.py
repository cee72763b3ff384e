"""SNIP, GraSP, SynFlow and GMP scores and masks against hand-worked values and plain-PyTorch computations.

Hand-checked toy: x -> W1 (2x2, no bias) -> W2 (1x2, no bias), one input x = (1, 1) and the
linear loss ℓ = Σ out (dℓ/dout = 1), so every gradient and Hessian-gradient product has a
closed form (worked out in each test). The conv-net references compute the published scores
with plain nn layers and torch.autograd / torch.func, never with bip_fast code.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bip_fast import GMP, SNIP, GraSP, SynFlow
from bip_fast.nn import sparsify
from bip_fast.pruning.grasp import grasp_scores
from bip_fast.pruning.saliency import keep_largest
from bip_fast.pruning.snip import snip_scores
from bip_fast.pruning.synflow import synflow_scores

from _baselines_helpers import conv_net, img_batches


W1 = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
W2 = torch.tensor([[2.0, -1.0]])


def tiny():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[1].weight.copy_(W2)
    return net


def sum_loss(out, _y):
    return out.sum()


ONE = [(torch.ones(1, 2), torch.zeros(1))]


def weights_of(net):
    return [m.weight for m in net.modules() if type(m) in (nn.Conv2d, nn.Linear)]


def masks_as_lists(alg):
    return [m.int().tolist() for m in alg.masks()]


def plain_keep_largest(scores, current, keep):
    """Reference: stable descending sort of the current entries' scores (earlier entry first)."""
    vals = torch.cat([s.reshape(-1).float() for s in scores])
    cur = torch.cat([c.reshape(-1) for c in current])
    pos = torch.nonzero(cur).flatten()
    order = torch.sort(-vals[pos], stable=True).indices[:keep]
    flat = torch.zeros_like(cur)
    flat[pos[order]] = True
    out, off = [], 0
    for s in scores:
        out.append(flat[off:off + s.numel()].view(s.shape))
        off += s.numel()
    return out


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("seed", range(4))
def test_keep_largest_matches_a_stable_sort(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (2, 2, 3)]
    scores = [torch.randint(-3, 4, s, generator=g).float() for s in shapes]  # ties, zeros, both signs
    scores[1][0] = -0.0
    current = [torch.rand(s, generator=g) < 0.8 for s in shapes]
    n = sum(int(c.sum()) for c in current)
    for keep in range(n + 1):
        got = keep_largest(scores, current, keep)
        want = plain_keep_largest(scores, current, keep)
        assert [a.tolist() for a in got] == [b.tolist() for b in want], keep
        assert sum(int(m.sum()) for m in got) == keep
        assert all(not bool((m & ~c).any()) for m, c in zip(got, current))  # pruned stay pruned


def test_keep_largest_bad_input():
    s = [torch.tensor([1.0, 2.0])]
    with pytest.raises(ValueError, match="keep"):
        keep_largest(s, [torch.tensor([True, False])], 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        keep_largest([torch.tensor([1.0, float("nan")])], [torch.ones(2, dtype=torch.bool)], 1)
    with pytest.raises(ValueError, match=r"current\[0\]"):
        keep_largest(s, [torch.ones(3, dtype=torch.bool)], 1)


# ----------------------------------------------------------------------------- SNIP
def test_snip_by_hand():
    # h = W1·x = (-1, 3.5); dℓ/dW2 = h = (-1, 3.5); dℓ/dW1 = W2ᵀ·xᵀ = [[2, 2], [-1, -1]].
    # |θ ⊙ g|: W1 [[2, 4], [0.5, 3]], W2 [[2, 3.5]]; keeping 3 of 6: 4, 3.5, 3.
    net = sparsify(tiny())
    s = snip_scores(net, ONE, sum_loss)
    assert s[0].tolist() == [[2.0, 4.0], [0.5, 3.0]] and s[1].tolist() == [[2.0, 3.5]]
    alg = SNIP(tiny(), 0.5, loss_fn=sum_loss)
    alg.prepare(ONE)
    assert masks_as_lists(alg) == [[[0, 1], [0, 1]], [[0, 1]]]


def test_snip_matches_plain_autograd_and_leaves_the_model_alone():
    bs = img_batches(1, 3)
    ref = conv_net()
    ws = weights_of(ref)
    g = [torch.zeros_like(w) for w in ws]
    for x, y in bs:
        for a, b in zip(g, torch.autograd.grad(F.cross_entropy(ref(x), y), ws)):
            a += b
    want = [(w * gw).abs() for w, gw in zip(ws, g)]
    model = sparsify(conv_net(bn=False))
    got = snip_scores(model, bs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    bn_model = conv_net(bn=True)
    before = copy.deepcopy(bn_model.state_dict())
    alg = SNIP(bn_model, 0.7)
    alg.prepare(bs)
    after = alg.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # weights, norm statistics untouched; only masks set
    N = sum(m.numel() for m in alg.masks())
    assert sum(int(m.sum()) for m in alg.masks()) == math.floor(0.3 * N + 0.5)


# ----------------------------------------------------------------------------- GraSP
def test_grasp_by_hand():
    # g: W1 [[2, 2], [-1, -1]], W2 [[-1, 3.5]] (as for SNIP). z = g·∇ℓ is
    # Σ_ij gW1_ij·W2_i·x_j + Σ_i gW2_i·(W1 x)_i, so Hg_W1[i, j] = gW2_i·x_j = [[-1, -1], [3.5, 3.5]]
    # and Hg_W2[i] = Σ_j gW1_ij·x_j = (4, -2). Keep-scores θ ⊙ Hg: W1 [[-1, 2], [1.75, 10.5]],
    # W2 [[8, 2]]. Keep 3 of 6: 10.5, 8 and the tie at 2 goes to the earlier layer (W1[0, 1]).
    net = sparsify(tiny())
    s = grasp_scores(net, ONE, sum_loss, temperature=1.0)
    assert s[0].tolist() == [[-1.0, 2.0], [1.75, 10.5]] and s[1].tolist() == [[8.0, 2.0]]
    alg = GraSP(tiny(), 0.5, temperature=1.0, loss_fn=sum_loss)
    alg.prepare(ONE)
    assert masks_as_lists(alg) == [[[0, 1], [0, 1]], [[1, 0]]]
    # Temperature T scales g and Hg by 1/T each (the loss is linear in the logits here).
    s4 = grasp_scores(net, ONE, sum_loss, temperature=4.0)
    for a, b in zip(s4, s):
        torch.testing.assert_close(a, b / 16)
    # Keep 5 of 6: only the negative score is removed.
    alg = GraSP(tiny(), 1 / 6, temperature=1.0, loss_fn=sum_loss)
    alg.prepare(ONE)
    assert masks_as_lists(alg) == [[[0, 1], [1, 1]], [[1, 1]]]


def test_grasp_matches_torch_func_hvp():
    from torch.func import functional_call, grad, jvp

    bs = img_batches(2, 2)
    ref = conv_net()
    names = [n + ".weight" for n, m in ref.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    params = {k: v.detach() for k, v in ref.named_parameters()}
    T = 200.0

    def f(ws):
        p = {**params, **ws}
        return sum(F.cross_entropy(functional_call(ref, p, (x,)) / T, y) for x, y in bs)

    ws = {k: params[k] for k in names}
    g = grad(f)(ws)
    hg = jvp(grad(f), (ws,), (g,))[1]
    want = [ws[k] * hg[k] for k in names]
    got = grasp_scores(sparsify(conv_net()), bs)
    scale = max(float(w.abs().max()) for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- SynFlow
def test_synflow_by_hand():
    # R = 1ᵀ|W2||W1|1: dR/d|W1|_ij = |W2|_i, dR/d|W2|_i = Σ_j |W1|_ij.
    # Scores: W1 [[2, 4], [0.5, 3]], W2 [[6, 3.5]] (divided by the maximum, 6).
    net = sparsify(tiny())
    s = synflow_scores(net, (2,))
    torch.testing.assert_close(s[0] * 6, torch.tensor([[2.0, 4.0], [0.5, 3.0]]))
    torch.testing.assert_close(s[1] * 6, torch.tensor([[6.0, 3.5]]))
    one = SynFlow(tiny(), 0.5, rounds=1)
    one.prepare(ONE)  # one round: keep 6, 4, 3.5
    assert masks_as_lists(one) == [[[0, 1], [0, 0]], [[1, 1]]]
    # Two rounds: round 1 keeps round(6·0.5^0.5) = 4 (drops 2 and 0.5); with W1 = [[0, -2], [0, 3]]
    # round 2 scores W1 [[0, 4], [0, 3]], W2 [[4, 3]] and keeps 3: 4, 4, and the tie at 3 goes to W1.
    two = SynFlow(tiny(), 0.5, rounds=2)
    two.prepare(ONE)
    assert masks_as_lists(two) == [[[0, 1], [0, 1]], [[1, 0]]]


def test_synflow_matches_plain_float64_and_prunes_exponentially():
    model = sparsify(conv_net(bn=True))
    with torch.no_grad():  # non-trivial norm statistics, also after abs()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
    ref = copy.deepcopy(conv_net(bn=True)).double().eval()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()
                         if not (k.endswith(".scores") or k.endswith(".mask"))})
    with torch.no_grad():
        for v in ref.state_dict().values():
            if v.is_floating_point():
                v.abs_()
    ws = weights_of(ref)
    grads = torch.autograd.grad(ref(torch.ones(1, 3, 6, 6, dtype=torch.float64)).sum(), ws)
    want = [(w * g).abs() for w, g in zip(ws, grads)]
    top = max(float(w.detach().max()) for w in want)
    got = synflow_scores(model, (3, 6, 6))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b / top, rtol=1e-6, atol=1e-9)
    # Exponential schedule: every round keeps round(d^(k/n)·N) (the last exactly K), observed by
    # wrapping the projection.
    alg = SynFlow(conv_net(bn=True), 0.9, rounds=5)
    N = sum(m.numel() for m in alg.masks())
    kept = []
    inner = alg._apply
    alg._apply = lambda s, d: (inner(s, d), kept.append(sum(int(m.sum()) for m in alg.masks())))
    alg.prepare(img_batches(3, 1))
    assert kept == [math.floor(0.1 ** (k / 5) * N + 0.5) for k in range(1, 6)]


# ----------------------------------------------------------------------------- GMP
def test_gmp_cubic_schedule_by_hand():
    alg = GMP(tiny(), 0.9, start_step=2, ramp_steps=4, prune_every=2, total_steps=10)
    # s_t = 0.9·(1 − (1 − (t − 2)/4)³)
    want = {0: 0.0, 2: 0.0, 3: 0.9 * (1 - 0.75 ** 3), 4: 0.9 * (1 - 0.5 ** 3), 5: 0.9 * (1 - 0.25 ** 3),
            6: 0.9, 9: 0.9}
    for t, s in want.items():
        assert alg.sparsity_at(t) == pytest.approx(s)
    assert [t for t in range(10) if alg.is_update_step(t)] == [2, 4, 6]
    odd = GMP(tiny(), 0.5, ramp_steps=5, prune_every=2, total_steps=8)
    assert [t for t in range(8) if odd.is_update_step(t)] == [0, 2, 4, 5]  # the ramp's end too


@pytest.mark.parametrize("structure", ["global", "layer"])
def test_gmp_masks_follow_the_schedule(structure):
    alg = GMP(conv_net(bn=True), 0.8, structure=structure, start_step=1, ramp_steps=5, prune_every=2,
              total_steps=9, lr=0.05)
    bs = img_batches(4, 9)
    sizes = [m.numel() for m in alg.masks()]
    for t, b in enumerate(bs):
        old = [m.clone() for m in alg.masks()]
        mags = [m.weight.detach().abs().clone() for m in alg.modules]
        alg.step(b)
        d = 1.0 - alg.sparsity_at(t)
        if not alg.is_update_step(t):
            assert all(torch.equal(a, b) for a, b in zip(old, alg.masks())), t
            continue
        if structure == "global":
            want = plain_keep_largest(mags, old, min(math.floor(d * sum(sizes) + 0.5), sum(int(m.sum()) for m in old)))
        else:
            want = [plain_keep_largest([w], [o], min(math.floor(d * n + 0.5), int(o.sum())))[0]
                    for w, o, n in zip(mags, old, sizes)]
        assert [m.tolist() for m in alg.masks()] == [w.tolist() for w in want], t
    per = [int(m.sum()) for m in alg.masks()]
    if structure == "global":
        assert sum(per) == math.floor(0.2 * sum(sizes) + 0.5)
    else:
        assert per == [math.floor(0.2 * n + 0.5) for n in sizes]
