"""Shared by the test_triton_* files: the Triton backend (CPU interpreter when there is no GPU), inputs, references.

Discrete outputs (masks, histograms) must be bit-equal, with ties on purpose; floating outputs
follow the house rule: error vs float64 at most 2x the error of the same-dtype torch computation
plus a small atol. Shapes are tiny because the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bip_fast.ops import triton as bt  # noqa: E402

_OK, _REASON = bt.available()
# each test_triton_* file: pytestmark = [needs_triton, pytest.mark.usefixtures("triton_registered")]
needs_triton = pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_REASON}")


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_masks_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.bool, f"mask {i}: dtype {g.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"mask {i}: shape {tuple(g.shape)}"
        assert torch.equal(g.cpu(), w), f"mask {i} differs at {(g.cpu() != w).nonzero()[:5].tolist()}"


def make_scores(kind, dtype, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shp in shapes:
        if kind == "ties":  # few distinct integer magnitudes, both signs and zeros
            s = torch.randint(-4, 5, shp, generator=gen).float()
        elif kind == "equal":
            s = torch.full(shp, -1.5)
        else:
            s = torch.randn(shp, generator=gen)
        out.append(s.to(dtype).to(DEV))
    return out


SHAPES = [(5, 7), (3000,), (4, 3, 3, 3)]


def _err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def sgd_plain(p, g, b, lr, mom, wd):
    p32, g32, b32 = p.float(), g.float(), b.float()
    d = g32 + wd * p32
    b32 = mom * b32 + d
    p32 = p32 - lr * b32
    return p32, b32


def _linear_case(dtype, x_shape, n_out, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=gen).to(dtype).to(DEV)
    w = (torch.randn(n_out, k, generator=gen) / k ** 0.5).to(dtype).to(DEV)
    s = torch.randn(n_out, k, generator=gen).to(DEV)
    s[0, :3] = 0.0
    m = (torch.rand(n_out, k, generator=gen) < 0.6).to(DEV)
    b = torch.randn(n_out, generator=gen).to(dtype).to(DEV) if bias else None
    gy = torch.randn(*x_shape[:-1], n_out, generator=gen).to(dtype).to(DEV)
    return x, w, s, m, b, gy
