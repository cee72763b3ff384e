"""Every bip_fast op once per backend on small shapes: the program compute-sanitizer watches.

scripts/gpu_check.sh runs it under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``
(tests/test_cuda_kernels.py is the correctness suite; this is the short, deterministic workload a
sanitizer can afford, tens of launches instead of thousands). Shapes straddle the kernels' chunk
border (8192 elements), include empty and one-element tensors, a misaligned view, a transposed
view and a channels_last tensor, and the three kernel dtypes, so every launch path of each kernel
runs at least once. Each result is compared with the pure-PyTorch reference on CPU copies, so a
kernel that writes nothing (or the wrong elements) is reported too, not only invalid accesses.

    compute-sanitizer --tool memcheck python3 scripts/ops_smoke.py --backends cuda
    python3 scripts/ops_smoke.py --device cpu --backends cpu,reference      # CPU dry run

Exit status: 0 all ops ran and matched, 1 a mismatch or an op raised, 2 a requested backend is
unavailable here (the reason is printed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

from bip_fast import ops  # noqa: E402
from bip_fast.ops import reference as ref  # noqa: E402
from bip_fast.ops._dispatch import backend_status  # noqa: E402

CHUNK = 8192  # kChunk of csrc/cuda/kernels.cuh
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def score_set(dtype: torch.dtype, device: torch.device, seed: int) -> List[torch.Tensor]:
    """Integer-valued scores (ties on purpose) of awkward shapes and layouts. Views are taken
    after the transfer: ``.to(device)`` of a view allocates fresh, aligned storage."""
    g = torch.Generator().manual_seed(seed)

    def ints(*shape):
        return torch.randint(-40, 41, shape, generator=g).to(dtype).to(device)

    return [ints(16, 3, 3, 3), ints(CHUNK + 3), ints(0), ints(1), ints(3, CHUNK - 1),
            ints(2 * CHUNK + 11)[1:],  # contiguous, one element off the allocation: misaligned path
            ints(48, 40).t(),  # transposed view
            ints(8, 6, 5, 5).contiguous(memory_format=torch.channels_last)]


def cpu(xs):
    return [x.detach().cpu() for x in xs]


def check_equal(name: str, got, want) -> None:
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape or not torch.equal(got, want):
        bad = int((got != want).sum()) if got.shape == want.shape else "shape"
        raise AssertionError(f"{name}: differs from the reference ({bad} elements)")


def check_close(name: str, got, want, tol: float) -> None:
    try:
        torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(),
                                   rtol=tol, atol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {str(e).splitlines()[0]}") from None


def case_histogram_topk(backend: str, device: torch.device) -> None:
    for i, dtype in enumerate(DTYPES):
        xs = score_set(dtype, device, seed=i)
        n = sum(x.numel() for x in xs)
        h = ops.radix_histogram(xs, backend=backend)
        check_equal(f"radix_histogram[{dtype}]", h, ref.radix_histogram_ref(cpu(xs), ref.D1_SHIFT, 12, 0, 31))
        for keep in (1, n // 3, n - 1):
            want = ref.topk_masks_ref(cpu(xs), keep)
            got = ops.topk_masks(xs, keep, backend=backend)
            for j, (a, b) in enumerate(zip(got, want)):
                check_equal(f"topk_masks[{dtype}, keep={keep}][{j}]", a, b)
            got = ops.topk_masks(xs, keep, hist1=h, backend=backend)  # histogram supplied
            for j, (a, b) in enumerate(zip(got, want)):
                check_equal(f"topk_masks(hist1)[{dtype}, keep={keep}][{j}]", a, b)


def case_masked_weight(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(10)
    for dtype in DTYPES:
        for shape in ((7,), (64, 3, 3, 3), (CHUNK + 3,), (0,), (33, 17)):
            theta = torch.randn(shape, generator=g).to(dtype)
            mask = torch.rand(shape, generator=g) > 0.4
            scores = torch.randint(-2, 3, shape, generator=g).to(dtype)  # zeros: sgn = +1
            grad = torch.randn(shape, generator=g).to(dtype)
            z = ops.masked_weight_forward(theta.to(device), mask.to(device), backend=backend)
            check_equal(f"masked_weight[{dtype}, {shape}]", z, ref.masked_weight_ref(theta, mask))
            for ig in (0.0, 1.0):
                got = ops.masked_weight_backward(grad.to(device), theta.to(device), mask.to(device),
                                                 scores.to(device), ig, backend=backend)
                want = ref.masked_weight_backward_ref(grad, theta, mask, scores, ig)
                check_close(f"masked_weight_backward[{dtype}, {shape}, ig={ig}] dtheta", got[0], want[0], TOL[dtype])
                check_close(f"masked_weight_backward[{dtype}, {shape}, ig={ig}] gscores", got[1], want[1],
                            4 * TOL[dtype])


def case_fused_sgd(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        shapes = [(64, 3, 3, 3), (10,), (CHUNK + 5,), (0,), (3, 1), (2 * CHUNK - 1, 2)]
        ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        gs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        bs = [(torch.randn(s, generator=g) * (i % 2)).to(dtype) for i, s in enumerate(shapes)]
        for with_hist in (False, True):
            p_dev = [p.clone().to(device) for p in ps]
            b_dev = [b.clone().to(device) for b in bs]
            p_ref = [p.clone() for p in ps]
            b_ref = [b.clone() for b in bs]
            h_dev = torch.zeros(4096, dtype=torch.int64, device=device) if with_hist else None
            h_ref = torch.zeros(4096, dtype=torch.int64) if with_hist else None
            ops.fused_sgd_(p_dev, [x.to(device) for x in gs], b_dev, 0.05, 0.9, 1e-3, hist1=h_dev, backend=backend)
            ref.fused_sgd_ref_(p_ref, gs, b_ref, 0.05, 0.9, 1e-3, h_ref)
            for j in range(len(shapes)):
                check_close(f"fused_sgd_[{dtype}, hist={with_hist}] params[{j}]", p_dev[j], p_ref[j], TOL[dtype])
                check_close(f"fused_sgd_[{dtype}, hist={with_hist}] buffers[{j}]", b_dev[j], b_ref[j], TOL[dtype])
            if with_hist:
                check_equal(f"fused_sgd_[{dtype}] hist1", h_dev, h_ref)


def case_masked_linear(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(12)
    for n_in, n_out, batch in ((40, 17, 5), (130, 70, 33)):
        x = torch.randn(batch, n_in, generator=g)
        w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        s = torch.randn(n_out, n_in, generator=g)
        m = torch.rand(n_out, n_in, generator=g) > 0.5
        b = torch.randn(n_out, generator=g)
        outs = []
        for be, dev in ((backend, device), ("reference", torch.device("cpu"))):
            leaves = [t.clone().to(dev).requires_grad_(True) for t in (x, w, s)]
            y = ops.masked_linear(leaves[0], leaves[1], leaves[2], m.to(dev), b.to(dev), 1.0, backend=be)
            y.square().sum().backward()
            outs.append([y] + [t.grad for t in leaves])
        # Triton's float32 dot runs in tf32: loose tolerance (the test suite checks accuracy).
        for name, a, r in zip(("y", "dx", "dweight", "dscores"), outs[0], outs[1]):
            check_close(f"masked_linear[{n_out}x{n_in}] {name}", a, r, 3e-2)


def case_raw_cuda_layouts(backend: str, device: torch.device) -> None:
    """The registered C++ ops called directly on strided and misaligned tensors (the public API
    hands kernels dense views; the ops themselves accept any layout)."""
    if backend != "cuda":
        return
    C = torch.ops.bip_fast
    xs = score_set(torch.float32, device, seed=20)
    n = sum(x.numel() for x in xs)
    for keep in (5, n // 2):
        for j, (a, b) in enumerate(zip(C.topk_masks(xs, keep), ref.topk_masks_ref(cpu(xs), keep))):
            check_equal(f"bip_fast::topk_masks(keep={keep})[{j}]", a, b)
    g = torch.Generator().manual_seed(21)
    theta = torch.randn(1003, generator=g).to(device)[1:]  # misaligned views, taken on the device
    mask = (torch.rand(1005, generator=g) > 0.5).to(device)[3:]
    check_equal("bip_fast::masked_weight(misaligned)", C.masked_weight(theta, mask),
                ref.masked_weight_ref(theta.cpu(), mask.cpu()))
    p = torch.randn(33, 70, generator=g).t()
    gr = torch.randn(70, 33, generator=g)
    buf = torch.randn(33, 70, generator=g).t()
    p_dev, b_dev = p.t().to(device).t(), buf.t().to(device).t()  # transposed views on the device
    hist = torch.zeros(4096, dtype=torch.int64, device=device)
    C.fused_sgd_([p_dev], [gr.to(device)], [b_dev], 0.01, 0.9, 1e-2, hist)
    p_ref, b_ref = p.clone(), buf.clone()
    ref.fused_sgd_ref_([p_ref], [gr], [b_ref], 0.01, 0.9, 1e-2, None)
    check_close("bip_fast::fused_sgd_(transposed) params", p_dev, p_ref, 1e-5)
    check_close("bip_fast::fused_sgd_(transposed) buffers", b_dev, b_ref, 1e-5)


CASES: List[Callable[[str, torch.device], None]] = [
    case_histogram_topk, case_masked_weight, case_fused_sgd, case_masked_linear, case_raw_cuda_layouts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--backends", default="cuda", help="comma list of cuda, triton, cpu, reference")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        ok, why = backend_status(b, device)
        if not ok:
            print(f"ops_smoke: backend {b!r} unavailable on {device}: {why}", flush=True)
            return 2
    failures = 0
    for b in backends:
        for case in CASES:
            t0 = time.perf_counter()
            try:
                case(b, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                status = "ok"
            except Exception as e:  # report every case, then fail
                failures += 1
                status = f"FAIL {type(e).__name__}: {e}"
            print(f"ops_smoke [{b}] {case.__name__}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"ops_smoke: {'all ops matched the reference' if not failures else f'{failures} case(s) failed'}",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
