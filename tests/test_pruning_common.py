"""Shared by all pruning algorithms: SGD and cosine schedule, resume, input checks, registry, metrics, conv nets."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bip_fast.nn import MaskedLinear, masked_modules
from bip_fast.pruning import ALGORITHMS, IMP, OMP, BiP, Dense, Hydra, cosine_factor, get_algorithm

from _pruning_helpers import batches, cls_batches, conv_net, img_batches, lin_loss, linear_toy


# ----------------------------------------------------------------------------- Dense, SGD, cosine
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


def test_include_exclude_on_an_already_masked_model_warn():
    """A model that already holds masked layers is not sparsified again: include/exclude given to
    the algorithm would be ignored silently, so a warning names the way that works."""
    import bip_fast

    torch.manual_seed(0)
    model = bip_fast.sparsify(conv_net(), exclude=["8"])
    before = [n for n, _ in masked_modules(model)]
    with pytest.warns(UserWarning, match="include/exclude are ignored"):
        alg = OMP(model, 0.5, exclude=["0"])
    assert [n for n, _ in masked_modules(alg.model)] == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OMP(bip_fast.sparsify(conv_net()), 0.5)  # no include/exclude: no warning
