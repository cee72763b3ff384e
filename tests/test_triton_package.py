"""The Triton backend as a package: availability, registration, torch.library.opcheck, torch.compile."""

import os
import subprocess
import sys

import pytest
import torch

from _triton_helpers import (DEV, _linear_case, assert_masks_equal, bt, make_scores, needs_triton,
                             sgd_plain)
from plain_ref import hist_plain, topk_plain


pytestmark = [needs_triton, pytest.mark.usefixtures("triton_registered")]


# ------------------------------------------------------------------------------------------
# package behaviour
# ------------------------------------------------------------------------------------------
def test_available_and_register_idempotent():
    ok, reason = bt.available()
    assert ok is True and reason == ""
    bt.register()
    bt.register()
    for name in ("topk_masks_triton", "topk_masks_hist_triton", "radix_histogram_triton",
                 "masked_weight_triton", "masked_weight_backward_triton", "fused_sgd_triton_",
                 "masked_linear_fwd_triton", "masked_linear_bwd_input_triton",
                 "masked_linear_bwd_weight_triton"):
        assert hasattr(torch.ops.bip_fast, name), name


def test_import_without_triton_reports_reason():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import bip_fast.ops.triton as bt\n"
        "ok, reason = bt.available()\n"
        "assert ok is False and 'triton' in reason, (ok, reason)\n"
        "try:\n"
        "    bt.register()\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('register() should raise')\n"
        "print('OK')\n"
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# torch.library.opcheck on every registered op (smallest shapes)
# ------------------------------------------------------------------------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_topk_and_histogram():
    ops = torch.ops.bip_fast
    scores = make_scores("ties", torch.float32, [(3, 4), (5,)], seed=2)
    _opcheck(ops.radix_histogram_triton.default, (scores, 19, 12, 0, 31))
    _opcheck(ops.topk_masks_triton.default, (scores, 6))
    hist1 = bt.radix_histogram_triton(scores, 19, 12, 0, 31)
    _opcheck(ops.topk_masks_hist_triton.default, (scores, 6, hist1))


def test_opcheck_masked_weight_and_sgd():
    ops = torch.ops.bip_fast
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(3, 4, generator=gen).to(DEV)
    m = (torch.rand(3, 4, generator=gen) < 0.5).to(DEV)
    s = torch.randn(3, 4, generator=gen).to(DEV)
    g = torch.randn(3, 4, generator=gen).to(DEV)
    _opcheck(ops.masked_weight_triton.default, (t, m))
    _opcheck(ops.masked_weight_backward_triton.default, (g, t, m, s, 0.5, True, True))
    _opcheck(ops.masked_weight_backward_triton.default, (g, t, m, s, 0.5, False, True))
    params = [t.clone(), s.clone()]
    _opcheck(ops.fused_sgd_triton_.default,
             (params, [g, g], [torch.zeros_like(t), torch.zeros_like(s)], 0.1, 0.9, 1e-4,
              torch.zeros(4096, dtype=torch.int64, device=DEV)))
    _opcheck(ops.fused_sgd_triton_.default,
             (params, [g, g], [torch.zeros_like(t), torch.zeros_like(s)], 0.1, 0.9, 1e-4, None))


def test_opcheck_masked_linear():
    ops = torch.ops.bip_fast
    x, w, s, m, b, gy = _linear_case(torch.float32, (4, 8), 5, True, seed=6)
    _opcheck(ops.masked_linear_fwd_triton.default, (x, w, m, b))
    _opcheck(ops.masked_linear_fwd_triton.default, (x, w, m, None))
    _opcheck(ops.masked_linear_bwd_input_triton.default, (gy, w, m))
    _opcheck(ops.masked_linear_bwd_weight_triton.default, (gy, x, w, m, s, 0.5, True, True))


# ------------------------------------------------------------------------------------------
# torch.compile traces the ops (aot_eager: no inductor codegen needed on CPU)
# ------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    scores = [torch.randn(4, 5, generator=gen).to(DEV), torch.randn(9, generator=gen).to(DEV)]
    p = torch.randn(10, generator=gen).to(DEV)
    g = torch.randn(10, generator=gen).to(DEV)
    b = torch.zeros(10, device=DEV)
    hist = torch.zeros(4096, dtype=torch.int64, device=DEV)

    def step(scores, p, g, b, hist):
        bt.fused_sgd_triton_([p], [g], [b], 0.1, 0.9, 0.0, hist)
        return bt.topk_masks_hist_triton(scores, 7, bt.radix_histogram_triton(scores, 19, 12, 0, 31))

    want_p, want_b = sgd_plain(p, g, b, 0.1, 0.9, 0.0)
    masks = torch.compile(step, backend="aot_eager", fullgraph=True)(scores, p, g, b, hist)
    assert_masks_equal(masks, topk_plain(scores, 7))
    assert torch.allclose(p, want_p, rtol=1e-6, atol=1e-7) and torch.allclose(b, want_b)
    assert torch.equal(hist.cpu(), hist_plain([p], 19, 12, 0, 31))

    x, w, s, m, _, _ = _linear_case(torch.float32, (3, 8), 5, False, seed=10)
    w.requires_grad_()
    s.requires_grad_()
    loss = torch.compile(lambda x, w, s: bt.masked_linear_triton(x, w, m, s, None, 1.0).sum(),
                         backend="aot_eager", fullgraph=True)
    loss(x, w, s).backward()
    G = x.sum(0).expand(5, 8)
    assert torch.allclose(w.grad, m * G, rtol=1e-5, atol=1e-6)
    sg = torch.where(s.detach() < 0, -1.0, 1.0)
    assert torch.allclose(s.grad, sg * (w.detach() * G - m * G * G), rtol=1e-5, atol=1e-5)
