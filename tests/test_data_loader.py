"""Tests for bip_fast.data loaders: augmentation, Loader and BilevelLoader batches, deterministic resume."""
import io

import pytest
import torch
import torch.nn.functional as F

from bip_fast import data
from bip_fast.data import BilevelLoader, Loader, augment_batch

from _data_helpers import needs_real


# --- augmentation ------------------------------------------------------------------------------

def _ref_augment(x, offsets, flips, pad=4):
    padded = F.pad(x, (pad,) * 4)
    out = []
    for i in range(x.shape[0]):
        r, c = offsets[i].tolist()
        w = padded[i, :, r:r + x.shape[2], c:c + x.shape[3]]
        out.append(w.flip(-1) if flips[i] else w)
    return torch.stack(out)


def test_augment_flip_is_exact_mirror():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    center = torch.full((6, 2), 4)
    out = augment_batch(x, center, torch.ones(6, dtype=torch.bool))
    assert out.dtype == torch.uint8 and torch.equal(out, x.flip(-1))
    assert torch.equal(augment_batch(x, center, torch.zeros(6, dtype=torch.bool)), x)


def test_augment_crop_is_shifted_window_with_zero_padding():
    x = torch.randint(1, 256, (2, 3, 32, 32), dtype=torch.uint8)  # no zeros in the image
    out = augment_batch(x, torch.tensor([[0, 0], [8, 5]]), torch.zeros(2, dtype=torch.bool))
    # sample 0: window starts 4 pixels above/left of the image
    assert torch.all(out[0, :, :4, :] == 0) and torch.all(out[0, :, :, :4] == 0)
    assert torch.equal(out[0, :, 4:, 4:], x[0, :, :28, :28])
    # sample 1: 4 rows down, 1 column right
    assert torch.equal(out[1, :, :28, :31], x[1, :, 4:, 1:])
    assert torch.all(out[1, :, 28:, :] == 0) and torch.all(out[1, :, :, 31:] == 0)
    # random grid vs a per-sample reference
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    off = torch.randint(0, 9, (64, 2), generator=g)
    fl = torch.randint(0, 2, (64,), generator=g)
    assert torch.equal(augment_batch(x, off, fl), _ref_augment(x, off, fl))
    assert torch.equal(augment_batch(x.float(), off, fl), _ref_augment(x.float(), off, fl))


def _unnormalise(out, mean, std):
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return torch.round((out * s + m) * 255).to(torch.uint8)


def test_train_loader_outputs_are_augmented_source_images():
    g = torch.Generator().manual_seed(1)
    n = 96
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ld = Loader(x, y, 32, train=True, mean=mean, std=std, seed=5)
    assert len(ld) == 3
    all_off = torch.tensor([(r, c) for r in range(9) for c in range(9)] * 2)
    all_fl = torch.tensor([0] * 81 + [1] * 81)
    seen, flipped, shifted = [], 0, 0
    for xb, yb in ld:
        assert xb.dtype == torch.float32 and xb.shape == (32, 3, 32, 32)
        rec = _unnormalise(xb, mean, std)
        for i in range(xb.shape[0]):
            src = x[yb[i]].expand(162, -1, -1, -1)
            cands = augment_batch(src, all_off, all_fl)
            hit = (cands == rec[i]).flatten(1).all(1).nonzero().flatten()
            assert hit.numel() >= 1, "output is not a crop/flip of its source image"
            k = hit[0].item()
            flipped += k >= 81
            shifted += (k % 81) != 40
        seen += yb.tolist()
    assert sorted(seen) == list(range(n))  # one epoch = a permutation
    assert seen != list(range(n))
    assert 0 < flipped < n and shifted > n // 2


def test_eval_loader_in_order_keeps_last_partial_batch():
    x = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(70) % 10
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    ld = data.eval_loader(x, y, 32, mean=mean, std=std)
    batches = list(ld)
    assert len(ld) == 3 and [b[0].shape[0] for b in batches] == [32, 32, 6]
    xs = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(xs, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([b[0] for b in ld]), xs)  # second pass identical


def test_channels_last_and_drop_last():
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(50, dtype=torch.long)
    ld = Loader(x, y, 16, train=True, seed=0, channels_last=True)
    batches = list(ld)
    assert len(batches) == 3 == len(ld)
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in batches)
    plain = [b[0] for b in Loader(x, y, 16, train=True, seed=0)]
    assert all(torch.equal(a[0], b) for a, b in zip(batches, plain))
    assert len(Loader(x, y, 16, train=True, drop_last=False)) == 4


def test_loader_validation():
    x = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="x: expected uint8"):
        Loader(x.float(), y, 4, train=True)
    with pytest.raises(ValueError, match="y: expected shape"):
        Loader(x, y[:5], 4, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(x, y, 0, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(x, y, 11, train=True)  # drop_last leaves no batch
    with pytest.raises(ValueError, match="mean/std"):
        Loader(x, y, 4, train=True, mean=(0.5,), std=(0.5,))
    ld = Loader(x, y, 4, train=True)
    other = Loader(torch.zeros(12, 3, 32, 32, dtype=torch.uint8), torch.zeros(12).long(), 4,
                   train=True)
    with pytest.raises(ValueError, match="num_samples"):
        ld.load_state_dict(other.state_dict())
    with pytest.raises(TypeError, match="lower"):
        BilevelLoader(None, ld)
    with pytest.raises(ValueError, match="distinct"):
        BilevelLoader(ld, ld)


# --- determinism and exact resume -------------------------------------------------------------

def _small_real(cifar, n=1000):
    return cifar.train_x[:n], cifar.train_y[:n]


def _loader(x, y, seed=0, bs=64):
    return Loader(x, y, bs, train=True, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                  seed=seed)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
                                    for p, q in zip(a, b))


@needs_real
def test_determinism_across_loaders_and_epochs(cifar):
    x, y = _small_real(cifar)
    a, b, c = _loader(x, y, seed=7), _loader(x, y, seed=7), _loader(x, y, seed=8)
    ea0, eb0, ec0 = list(a), list(b), list(c)
    assert _same(ea0, eb0) and not _same(ea0, ec0)
    assert a.epoch == 1 and a.position == 0
    ea1 = list(a)
    assert not _same(ea0, ea1)
    d = _loader(x, y, seed=7)
    d.set_epoch(1)
    assert _same(list(d), ea1)


@needs_real
def test_exact_resume_mid_epoch(cifar):
    x, y = _small_real(cifar)
    ref = _loader(x, y, seed=11)
    full = list(ref) + list(ref)  # two uninterrupted epochs
    nb = len(ref)

    run = _loader(x, y, seed=11)
    list(run)  # epoch 0
    it = iter(run)
    k = 5
    head = [next(it) for _ in range(k)]
    assert _same(head, full[nb:nb + k])
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == k
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = _loader(x, y, seed=999)  # seed and generator state come from the state
    restored.load_state_dict(torch.load(buf, weights_only=False))
    assert restored.seed == 11
    rest = list(restored)
    assert _same(rest, full[nb + k:])
    # and the next epoch after the resumed one matches a fresh loader's third epoch
    third = list(ref)
    assert _same(list(restored), third)
    # the interrupted loader itself continues where it stopped with a new iterator
    assert _same(list(run), full[nb + k:])


def test_superseded_iterator_raises():
    x = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    ld = Loader(x, torch.zeros(20).long(), 4, train=True)
    it1 = iter(ld)
    next(it1)
    it2 = iter(ld)
    next(it2)
    with pytest.raises(RuntimeError, match="superseded"):
        next(it1)


def test_bilevel_independent_shuffles_and_resume():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64)

    def make():
        lower = Loader(x[:40], y[:40], 8, train=True, seed=1)   # 5 batches: wraps around
        upper = Loader(x[40:], y[40:], 4, train=True, seed=2)   # 6 batches per epoch
        return BilevelLoader(lower, upper)

    bl = make()
    assert len(bl) == 6
    e0 = list(bl)
    e1 = list(bl)
    assert len(e0) == 6 and bl.epoch == 2
    low = torch.cat([lb[1] for lb, _ in e0] + [lb[1] for lb, _ in e1])
    assert sorted(low[:40].tolist()) == list(range(40))  # lower's first epoch is a permutation
    assert sorted(torch.cat([ub[1] for _, ub in e0]).tolist()) == list(range(40, 64))
    assert bl.lower.epoch == 2  # 12 lower batches = two epochs and two batches

    # resume mid-epoch 1 (lower is in its second epoch at that point)
    bl2 = make()
    list(bl2)
    it = iter(bl2)
    head = [next(it) for _ in range(3)]
    state = bl2.state_dict()
    bl3 = make()
    bl3.load_state_dict(state)
    rest = list(bl3)
    got = head + rest
    assert len(got) == 6
    for (l1, u1), (l2, u2) in zip(got, e1):
        assert torch.equal(l1[0], l2[0]) and torch.equal(l1[1], l2[1])
        assert torch.equal(u1[0], u2[0]) and torch.equal(u1[1], u2[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    cpu = Loader(x, y, 64, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=4)
    gpu = Loader(x.cuda(), y.cuda(), 64, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=4,
                 channels_last=True)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda
        assert xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-6, rtol=0)
