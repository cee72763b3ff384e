"""SNIP, GraSP, SynFlow and GMP as training algorithms: exact K, resume, the prepare contract, bad arguments."""

import math

import pytest
import torch

from bip_fast import GMP, SNIP, GraSP, SynFlow
from bip_fast.pruning import get_algorithm

from _baselines_helpers import BASELINES, conv_net, img_batches


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
