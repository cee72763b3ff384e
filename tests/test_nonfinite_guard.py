"""The device-side divergence guard: fused_sgd_'s skip flag on every backend, deferred host reads
(sticky skip, nothing changes until the host looks), a bounded skip budget, and the Trainer."""
import json
import math

import pytest
import torch

from bip_fast import ops
from bip_fast.engine.loop import DivergedError, Trainer
from bip_fast.ops import triton as bt
from bip_fast.pruning import get_algorithm
from bip_fast.pruning.base import NonFiniteError

from _integrity_helpers import poison_second_batch
from plain_ref import hist_plain
from test_loop import config, synthetic, tiny_model

_TRITON_OK = bt.available()[0]


_CUDA = torch.cuda.is_available()


def _sgd_inputs(seed=3, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (37,), (5, 9)]
    return ([torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3))


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("with_hist", [False, True])
def test_fused_sgd_skip_flag(backend, with_hist):
    if backend == "triton" and not _TRITON_OK:
        pytest.skip("triton backend unavailable")
    if backend == "cuda" and not _CUDA:
        pytest.skip("no CUDA device")
    dev = "cuda" if _CUDA and backend in ("cuda", "triton") else "cpu"
    params, grads, bufs = _sgd_inputs(device=dev)
    p0, b0 = [p.clone() for p in params], [b.clone() for b in bufs]
    hist = torch.zeros(4096, dtype=torch.int64, device=dev) if with_hist else None
    ops.fused_sgd_(params, grads, bufs, 0.1, 0.9, 1e-2, hist1=hist,
                   skip=torch.ones((), dtype=torch.bool, device=dev), backend=backend)
    for a, b in zip(params + bufs, p0 + b0):
        assert torch.equal(a, b)  # nothing stored
    if with_hist:  # the histogram of the unchanged params, so the next top-K is exact
        assert torch.equal(hist.cpu(), hist_plain([p.cpu() for p in params], 19, 12, 0, 31))
    want_p, want_b = [p.clone() for p in p0], [b.clone() for b in b0]
    ops.fused_sgd_(want_p, grads, want_b, 0.1, 0.9, 1e-2, backend=backend)
    ops.fused_sgd_(params, grads, bufs, 0.1, 0.9, 1e-2, skip=torch.zeros(1, dtype=torch.bool, device=dev),
                   backend=backend)
    for a, b in zip(params + bufs, want_p + want_b):
        assert torch.equal(a, b)  # a false flag is the plain update, bit for bit
    assert not torch.equal(params[0], p0[0])


@pytest.mark.parametrize("bad", [torch.ones(()), torch.ones(2, dtype=torch.bool), "yes"])
def test_fused_sgd_skip_must_be_one_bool(bad):
    params, grads, bufs = _sgd_inputs()
    p0 = [p.clone() for p in params]
    with pytest.raises((TypeError, ValueError), match="skip"):
        ops.fused_sgd_(params, grads, bufs, 0.1, 0.9, 0.0, skip=bad)
    assert all(torch.equal(a, b) for a, b in zip(params, p0))


@pytest.mark.skipif(not _CUDA, reason="no CUDA device")
def test_guard_and_skipped_update_do_not_synchronise():
    """The point of the device-side flag: observing a pass and the skipped update never wait for the GPU."""
    alg = get_algorithm("omp")(tiny_model().cuda(), 0.5)
    alg.nonfinite.check_every = 10**6
    x, y = (t.cuda() for t in _batches(1, bad_at={0})[0])
    loss = alg.loss_fn(alg.model(x), y)
    loss.backward()
    named = [(n, p.grad) for n, p in alg.model.named_parameters() if p.grad is not None]
    bufs = [b for b in alg.model.buffers() if b.dtype != torch.bool]
    saved = [b.clone() for b in bufs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        skip = alg.nonfinite.observe(0, loss, named, bufs, saved)
        alg.param_groups["weights"].step(0.1, skip=skip)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(skip)
    with pytest.raises(NonFiniteError, match="step 0: non-finite loss"):
        alg.nonfinite.check()


# ----------------------------------------------------------------------------- algorithms
CASES = [("bip", {}), ("bip", {"schedule": "fused"}), ("bip", {"variant": "official"}), ("hydra", {}),
         ("imp", {"rewind_step": 0}), ("omp", {}), ("gmp", {"start_step": 0, "ramp_steps": 8, "prune_every": 8})]


def _make(name, kw):
    args = () if name == "imp" else (0.5,)  # IMP prunes by rounds, not to a target
    return get_algorithm(name)(tiny_model(), *args, **kw)


def _batches(n, bad_at=()):
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        x = torch.randn(8, 3, 32, 32, generator=gen)
        if i in bad_at:
            x[0, 0, 0, 0] = math.nan
        out.append((x, torch.randint(0, 10, (8,), generator=gen)))
    return out


def _snapshot(alg):
    model = {k: v.clone() for k, v in alg.model.state_dict().items()}
    bufs = {k: [b.clone() for b in g.buffers] for k, g in alg.param_groups.items()}
    return model, bufs


def _assert_same(alg, snap, what):
    model, bufs = snap
    for k, v in alg.model.state_dict().items():  # weights, scores, masks, BN statistics
        assert torch.equal(v, model[k]), (what, k)
    for k, g in alg.param_groups.items():  # momenta
        for a, b in zip(g.buffers, bufs[k]):
            assert torch.equal(a, b), (what, k)


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(k) or 'default'}" for n, k in CASES])
def test_deferred_check_freezes_the_state_until_the_host_looks(name, kw):
    """With host reads deferred (as on a GPU), a bad step and every step after it apply nothing."""
    torch.manual_seed(0)
    alg = _make(name, kw)
    alg.nonfinite.check_every = 1000
    batches = _batches(5, bad_at={1})
    alg.step(batches[0])
    snap = _snapshot(alg)
    for b in batches[1:]:  # the bad step, then good steps: no error yet, no change either
        out = alg.step(b)
    assert bool(out["skipped"])
    _assert_same(alg, snap, name)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite loss \(nan\); no update was applied"):
        alg.nonfinite.check()
    alg.step(batches[1])
    with pytest.raises(NonFiniteError):  # nothing diverged can be saved or pruned from either
        alg.next_round() if name == "imp" else alg.state_dict()
    _assert_same(alg, snap, name)
    alg.nonfinite.check_every = None  # CPU default: read every pass
    alg.step(batches[0])  # reported and cleared: training goes on from the untouched state
    assert any(not torch.equal(v, snap[0][k]) for k, v in alg.model.state_dict().items())


def test_gmp_cut_reads_the_flag_first():
    torch.manual_seed(0)
    alg = _make("gmp", {"start_step": 0, "ramp_steps": 4, "prune_every": 2})
    alg.nonfinite.check_every = 1000
    batches = _batches(3, bad_at={1})
    alg.step(batches[0])
    alg.step(batches[1])
    snap = _snapshot(alg)
    with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
        alg.step(batches[2])  # step 2 starts with a cut: the flag is read before the masks move
    _assert_same(alg, snap, "gmp")


def test_skip_budget_skips_then_stops():
    torch.manual_seed(0)
    alg = get_algorithm("bip")(tiny_model(), 0.5)
    alg.nonfinite.limit = 1
    batches = _batches(4, bad_at={1, 3})
    alg.step(batches[0])
    snap = _snapshot(alg)
    out = alg.step(batches[1])  # within the budget: skipped, no error
    assert bool(out["skipped"]) and alg.nonfinite.check() == 1
    _assert_same(alg, snap, "skipped")
    out = alg.step(batches[2])  # a good step applies again
    assert not bool(out["skipped"])
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss .*\(2 non-finite steps, 1 allowed\)"):
        alg.step(batches[3])


def test_nonfinite_gradient_is_named():
    torch.manual_seed(0)
    alg = get_algorithm("omp")(tiny_model(), 0.5)
    alg.model[8].bias.register_hook(lambda g: g * math.inf)
    snap = _snapshot(alg)
    with pytest.raises(NonFiniteError, match=r"step 0: non-finite gradient of '8.bias' \(the loss is finite\)"):
        alg.step(_batches(1)[0])
    _assert_same(alg, snap, "gradient")


# ----------------------------------------------------------------------------- trainer
def _deferred_trainer(out, monkeypatch, *, limit=0):
    build = Trainer._build_algorithm

    def deferred(self, seg):
        alg = build(self, seg)
        alg.nonfinite.check_every = 10**6  # only the Trainer's epoch-end read
        return alg

    monkeypatch.setattr(Trainer, "_build_algorithm", deferred)
    tr = Trainer(config(out, command="pretrain", method="dense", epochs=1, lr=0.05, nonfinite_skips=limit),
                 dataset=synthetic(), model_fn=tiny_model)
    return poison_second_batch(tr, math.inf)


def test_trainer_reads_the_flag_at_epoch_end(tmp_path, monkeypatch):
    with pytest.raises(DivergedError, match=r"step 1: non-finite loss .*no checkpoint was written"):
        _deferred_trainer(tmp_path / "stop", monkeypatch).run()
    assert not (tmp_path / "stop" / "checkpoint.pt").exists() and not (tmp_path / "stop" / "model.pt").exists()
    rep = _deferred_trainer(tmp_path / "skip", monkeypatch, limit=1).run()
    rec = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_steps"] == 1 and math.isfinite(rec["train_loss"]) and rep["epochs"] == 1
