"""Triton radix-histogram and top-K mask kernels against plain PyTorch, bit for bit with ties on purpose."""

import pytest
import torch

from _triton_helpers import DEV, DTYPES, SHAPES, assert_masks_equal, bt, make_scores, needs_triton
from plain_ref import hist_plain, keys_of, topk_plain


pytestmark = [needs_triton, pytest.mark.usefixtures("triton_registered")]


# ------------------------------------------------------------------------------------------
# radix histogram and top-K masks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_passes(dtype):
    scores = make_scores("randn", dtype, SHAPES, seed=1)
    keys = keys_of(scores)
    top = int(keys.max())
    cases = [
        (19, 12, 0, 31),                 # D1, all elements
        (7, 12, top >> 19, 19),          # D2 under the top D1 bucket
        (0, 7, top >> 7, 7),             # D3 under the top 25-bit prefix
        (7, 12, 12345, 19),              # prefix that matches nothing
    ]
    for shift, bits, prefix, pshift in cases:
        got = bt.radix_histogram_triton(scores, shift, bits, prefix, pshift)
        assert got.dtype == torch.int64 and got.shape == (4096,)
        assert torch.equal(got.cpu(), hist_plain(scores, shift, bits, prefix, pshift)), (shift, prefix)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["ties", "equal", "randn"])
def test_topk_masks_bit_equal(kind, dtype):
    scores = make_scores(kind, dtype, SHAPES)
    n = sum(s.numel() for s in scores)
    for keep in (0, 1, 40, n // 2, n - 1, n):
        got = bt.topk_masks_triton(scores, keep)
        assert sum(int(m.sum()) for m in got) == keep
        assert_masks_equal(got, topk_plain(scores, keep))


def test_topk_masks_ties_span_tensors_and_blocks():
    # Many equal keys across several tensors, across the 2048-element count blocks and across
    # several 8192-element histogram programs: the kept ties must be exactly the first ones in
    # (tensor, flat index) order.
    s0 = torch.full((7,), 2.0)
    s1 = torch.full((20000,), -2.0)
    s1[::3] = 3.0
    s2 = torch.full((9,), 2.0)
    scores = [s.to(DEV) for s in (s0, s1, s2)]
    big = int((s1 == 3.0).sum())
    for keep in (big + 1, big + 7, big + 8, big + 2500, big + 13000):
        assert_masks_equal(bt.topk_masks_triton(scores, keep), topk_plain(scores, keep))


def test_topk_masks_special_values():
    # signed zeros, subnormals, and values differing only in the last digits of the key
    s = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 1.0000001, 3e38, -3e38, 2.0 ** -126])
    scores = [s.to(DEV), s.flip(0).to(DEV)]
    for keep in range(0, 21):
        assert_masks_equal(bt.topk_masks_triton(scores, keep), topk_plain(scores, keep))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_topk_masks_non_contiguous(layout):
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (6, 5, 3, 4), generator=gen).float().to(DEV)
    if layout == "transposed":
        s = base.reshape(30, 12).t()
    elif layout == "channels_last":
        s = base.contiguous(memory_format=torch.channels_last)
    else:
        s = base[:, ::2, 1:, :]
    other = torch.randint(-3, 4, (50,), generator=gen).float().to(DEV)
    scores = [s, other]
    n = s.numel() + other.numel()
    for keep in (1, 17, n // 2, n - 1):
        assert_masks_equal(bt.topk_masks_triton(scores, keep), topk_plain(scores, keep))


def test_topk_masks_hist_matches():
    scores = make_scores("ties", torch.float32, [(33,), (2, 40)] + [(0,)], seed=5)
    hist1 = bt.radix_histogram_triton(scores, 19, 12, 0, 31)
    n = sum(s.numel() for s in scores)
    for keep in (0, 1, 50, n - 1, n):
        got = bt.topk_masks_hist_triton(scores, keep, hist1)
        assert_masks_equal(got, topk_plain(scores, keep))
