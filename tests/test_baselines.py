"""SNIP, GraSP, SynFlow and GMP against hand-worked values and plain-PyTorch computations.

Hand-checked toy: x -> W1 (2x2, no bias) -> W2 (1x2, no bias), one input x = (1, 1) and the
linear loss ℓ = Σ out (dℓ/dout = 1), so every gradient and Hessian-gradient product has a
closed form (worked out in each test). The conv-net references compute the published scores
with plain nn layers and torch.autograd / torch.func, never with bip_fast code.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bip_fast import GMP, SNIP, GraSP, SynFlow
from bip_fast.nn import sparsify
from bip_fast.pruning import get_algorithm
from bip_fast.pruning.grasp import grasp_scores
from bip_fast.pruning.saliency import keep_largest
from bip_fast.pruning.snip import snip_scores
from bip_fast.pruning.synflow import synflow_scores

W1 = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
W2 = torch.tensor([[2.0, -1.0]])
BASELINES = ("snip", "grasp", "synflow", "gmp")


def tiny():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[1].weight.copy_(W2)
    return net


def sum_loss(out, _y):
    return out.sum()


ONE = [(torch.ones(1, 2), torch.zeros(1))]


def conv_net(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1)]
    layers += [nn.BatchNorm2d(6)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def img_batches(seed, n, b=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


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


# ----------------------------------------------------------------------------- common
def make(name, sparsity=0.75, **kw):
    extra = {"gmp": {"ramp_steps": 3, "prune_every": 1}, "synflow": {"rounds": 4}}.get(name, {})
    alg = get_algorithm(name)(conv_net(bn=True), sparsity, lr=0.05, momentum=0.9, weight_decay=1e-3,
                              total_steps=6, **extra, **kw)
    alg.prepare(img_batches(5, 2))
    return alg


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9, 0.98])
def test_exact_k(name, sparsity):
    alg = make(name, sparsity)
    bs = img_batches(6, 5)
    for b in bs:
        out = alg.step(b)
        assert bool(torch.isfinite(out["loss"]))
    N = sum(m.numel() for m in alg.masks())
    assert sum(int(m.sum()) for m in alg.masks()) == math.floor((1 - sparsity) * N + 0.5)
    assert alg.sparsity() == pytest.approx(sparsity, abs=1 / N)


@pytest.mark.parametrize("name", BASELINES)
def test_layerwise_exact_k(name):
    alg = make(name, 0.6, structure="layer")
    for b in img_batches(7, 4):
        alg.step(b)
    assert [int(m.sum()) for m in alg.masks()] == [math.floor(0.4 * m.numel() + 0.5) for m in alg.masks()]


@pytest.mark.parametrize("name", BASELINES)
def test_resume_is_bit_identical(name):
    bs = img_batches(8, 5)
    straight = make(name)
    for b in bs:
        straight.step(b)
    first = make(name)
    for b in bs[:3]:
        first.step(b)
    sd = first.state_dict()
    first.step(bs[3])  # the saved state must not alias live tensors
    resumed = get_algorithm(name)(conv_net(bn=True), 0.75, lr=0.05, momentum=0.9, weight_decay=1e-3, total_steps=6,
                                  **({"gmp": {"ramp_steps": 3, "prune_every": 1}, "synflow": {"rounds": 4}}
                                     .get(name, {})))
    resumed.load_state_dict(sd)  # no second prepare: the cut comes with the state
    for b in bs[3:]:
        resumed.step(b)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for a, b in zip(straight.param_groups["weights"].buffers, resumed.param_groups["weights"].buffers):
        assert torch.equal(a, b)
    assert straight.step_count == resumed.step_count == 5


@pytest.mark.parametrize("name", ["snip", "grasp", "synflow"])
def test_prepare_contract(name):
    cls = get_algorithm(name)
    alg = cls(conv_net(), 0.5)
    with pytest.raises(RuntimeError, match="prepare"):
        alg.step(img_batches(9, 1)[0])
    with pytest.raises(ValueError, match="batches: expected at least one"):
        alg.prepare([])
    with pytest.raises(TypeError, match="batches"):
        alg.prepare(torch.ones(3))
    with pytest.raises(TypeError, match=r"batches\[0\]"):
        alg.prepare([torch.ones(2, 3, 6, 6)])
    alg.prepare(iter(img_batches(9, 2)))  # any iterable
    with pytest.raises(RuntimeError, match="already"):
        alg.prepare(img_batches(9, 1))
    with pytest.raises(ValueError, match="structure"):
        cls(conv_net(), 0.5, structure="filter")
    with pytest.raises(ValueError, match="sparsity"):
        cls(conv_net(), 1.0)


def test_baseline_bad_hparams():
    with pytest.raises(ValueError, match="temperature"):
        GraSP(conv_net(), 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="rounds"):
        SynFlow(conv_net(), 0.5, rounds=0)
    with pytest.raises(TypeError, match="rounds"):
        SynFlow(conv_net(), 0.5, rounds=2.0)
    with pytest.raises(ValueError, match="ramp_steps: needed"):
        GMP(conv_net(), 0.5)
    with pytest.raises(ValueError, match="must be < total_steps"):
        GMP(conv_net(), 0.5, start_step=3, ramp_steps=7, total_steps=10)
    with pytest.raises(ValueError, match="initial_sparsity"):
        GMP(conv_net(), 0.5, initial_sparsity=0.6, ramp_steps=2)
    with pytest.raises(ValueError, match="prune_every"):
        GMP(conv_net(), 0.5, ramp_steps=2, prune_every=0)
    gmp = GMP(conv_net(), 0.5, ramp_steps=2, total_steps=8)
    with pytest.raises(ValueError, match="ramp_steps"):
        gmp.load_state_dict(GMP(conv_net(), 0.5, ramp_steps=3, total_steps=8).state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        SNIP(conv_net(), 0.5).load_state_dict(GraSP(conv_net(), 0.5).state_dict())


# ----------------------------------------------------------------------------- engine + CLI
def test_engine_plans_and_runs_every_baseline(tmp_path):
    from test_loop import config, synthetic, tiny_model

    from bip_fast.engine import Trainer, plan_segments

    for name in BASELINES:
        cfg = config(tmp_path / name, method=name, sparsity=0.8, epochs=2, pretrain_epochs=1, synflow_rounds=3,
                     gmp_every=1).resolved()
        kinds = [s.kind for s in plan_segments(cfg)]
        assert kinds == (["dense", "gmp"] if name == "gmp" else [name])  # SNIP/GraSP/SynFlow prune the init
        rep = Trainer(cfg, dataset=synthetic(), model_fn=tiny_model).run()
        assert rep["kept"] == math.floor(0.2 * rep["prunable"] + 0.5), name
        hist = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(hist) == len(kinds) + 1


@pytest.mark.parametrize("name,kill_after", [("grasp", 1), ("gmp", 2)])
def test_engine_resume_is_bit_identical(tmp_path, name, kill_after):
    from test_loop import Kill, assert_same, config, final_state, killer, synthetic, tiny_model

    from bip_fast.engine.loop import Trainer

    kw = dict(method=name, sparsity=0.7, epochs=2, pretrain_epochs=1, gmp_every=1, score_samples=20)
    ds = synthetic()
    straight = Trainer(config(tmp_path / "a", **kw), dataset=ds, model_fn=tiny_model)
    straight.run()
    first = Trainer(config(tmp_path / "b", **kw), dataset=ds, model_fn=tiny_model, callbacks=[killer(kill_after)])
    with pytest.raises(Kill):
        first.run()
    resumed = Trainer(config(tmp_path / "b", resume=True), dataset=ds, model_fn=tiny_model)
    resumed.run()
    for a, b, what in zip(final_state(straight), final_state(resumed), ("model", "algorithm")):
        assert_same(a, b, what)


def test_cli_flags_and_errors(tmp_path, capsys):
    from bip_fast.cli import main
    from bip_fast.engine.hparams import RunConfig

    cfg = RunConfig.from_flat({"method": "grasp", "command": "prune"}).resolved()
    assert (cfg.train.epochs, cfg.train.lr, cfg.prune.grasp_temperature) == (160, 0.1, 200.0)
    assert RunConfig.from_flat({"method": "gmp"}).resolved().train.epochs == 100
    for argv, expect in (
        (["--method", "snip", "--structure", "filter"], "structure: snip prunes globally or layer-wise"),
        (["--method", "grasp", "--grasp-temperature", "0"], "grasp_temperature"),
        (["--method", "synflow", "--synflow-rounds", "0"], "synflow_rounds"),
        (["--method", "gmp", "--gmp-every", "0"], "gmp_every"),
    ):
        assert main(["prune", "--out", str(tmp_path / "x"), *argv]) == 2
        assert expect in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
