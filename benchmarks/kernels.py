"""Kernel benchmarks of bip_fast's ops against the PyTorch baselines they replace.

Sections (each backend is checked against the reference on the same inputs before it is timed;
a mismatch aborts the run, a backend that raises is reported as an error row and skipped):

1. ``topk``    global top-K masks over the 21 weight tensors of a CIFAR ResNet-18 (11.17M
               scores) at density 0.1 and 0.5, vs ``torch.sort`` / ``torch.kthvalue`` /
               ``torch.topk`` of the concatenated |s| (the baselines include the ``cat`` and
               ``abs`` but not building masks from the threshold, which only favours them);
               also relative to one read of the scores at the measured bandwidth, and the
               variant with the first-digit histogram supplied (as after ``fused_sgd_``).
2. ``sgd``     ``fused_sgd_`` over the same 21 tensors vs the unfused ``torch._foreach_*``
               sequence and ``torch.optim.SGD(foreach=True).step()``; bytes that must move:
               read p, g, b and write p, b = 20 bytes per element (fp32).
3. ``modules`` MaskedLinear / MaskedConv2d forward + backward (scores need grad, ig_scale 1.0)
               vs nn.Linear / nn.Conv2d of the same shape.

Targets (printed next to each figure): GPU topk >= 20x torch.sort and <= 3 reads of the
scores; CPU topk >= 3x torch.sort and torch.kthvalue; GPU fused_sgd_ >= 70% of the measured copy
bandwidth, CPU faster than the _foreach sequence; masked modules <= 1.10x dense.

Usage:
    python benchmarks/kernels.py                    # full run, JSON to benchmarks/results/
    python benchmarks/kernels.py --quick --json /tmp/k.json --device cpu
    python benchmarks/kernels.py --backends cuda,triton --sections topk,sgd
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:  # imported as part of a package (python -m benchmarks.kernels)
    from . import _common as C
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]

SECTIONS = ("topk", "sgd", "modules")


class CorrectnessError(RuntimeError):
    """A backend disagrees with the reference on the benchmark inputs: the run is aborted."""


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
# CIFAR ResNet-18 (3x3 stem, BasicBlocks [2, 2, 2, 2], 1x1 projection shortcuts, fc 512 -> 10),
# in registration order; used only if bip_fast.models cannot build the model.
_RESNET18_SHAPES: List[Tuple[int, ...]] = (
    [(64, 3, 3, 3)]
    + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3)]
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), (512, 512, 3, 3), (512, 512, 3, 3)]
    + [(10, 512)]
)


def resnet18_weights(seed: int = 0) -> Tuple[List[torch.Tensor], str]:
    """The 21 prunable weights of a freshly initialised CIFAR ResNet-18 (CPU, fp32) and where the
    shapes came from. Real initialisations give each layer its own magnitude range, which is
    what the radix select sees in training."""
    torch.manual_seed(seed)
    try:
        from bip_fast import models

        model = models.build("resnet18")
        ws = [m.weight.detach().clone() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        return ws, "bip_fast.models.build('resnet18')"
    except Exception as e:  # engine not importable: same architecture, Kaiming-uniform-like init
        C.log(f"kernels: building resnet18 failed ({type(e).__name__}: {e}); using hard-coded shapes")
        ws = []
        for shp in _RESNET18_SHAPES:
            fan_in = 1
            for d in shp[1:]:
                fan_in *= d
            bound = 1.0 / fan_in**0.5
            ws.append((torch.rand(shp) * 2 - 1) * bound)
        return ws, "hard-coded ResNet-18 shapes"


def shrink(ws: Sequence[torch.Tensor], factor: int = 8) -> List[torch.Tensor]:
    """--quick: the same layer list with channel dimensions >= 64 divided by ``factor``."""
    out = []
    for w in ws:
        shp = [d // factor if i < 2 and d >= 64 else d for i, d in enumerate(w.shape)]
        out.append(w.flatten()[: _numel(shp)].reshape(shp).clone())
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt_n(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class Runner:
    """Holds device, timing budget and result rows; runs one guarded measurement at a time."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.rows: List[C.Row] = []
        self.errors: List[Dict[str, str]] = []
        self.gpu = device.type == "cuda"

    def time(self, fn: Callable[[], Any], *, slow: bool = False, warmup: Optional[int] = None) -> C.Timing:
        """``slow``: baselines and reference paths that take ~1 s per call on a 2-core CPU get
        fewer repeats. ``warmup``: override (0 where the correctness call already warmed up)."""
        a = self.args
        if slow:
            return C.bench(fn, self.device, warmup=1 if warmup is None else warmup, repeats=a.slow_repeats,
                           max_seconds=a.max_seconds / 2, min_repeats=min(3, a.slow_repeats))
        return C.bench(fn, self.device, warmup=a.warmup if warmup is None else warmup, repeats=a.repeats,
                       max_seconds=a.max_seconds, min_repeats=min(3, a.repeats))

    def add(self, row: C.Row) -> C.Row:
        self.rows.append(row)
        t = row.timing
        ms = f"{t.median_ms:.3f} ms (n={t.n})" if t else ""
        C.log(f"  {row.op:<28} {row.backend:<22} {row.config:<34} {ms} {row.metric}")
        return row

    def error(self, op: str, backend: str, config: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        self.errors.append({"op": op, "backend": backend, "config": config, "error": msg})
        self.rows.append(C.Row(op, backend, config, metric=f"error: {msg}"))
        C.log(f"  {op} [{backend}] {config}: skipped, {msg}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def _check_masks(name: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    if len(got) != len(want):
        raise CorrectnessError(f"{name}: {len(got)} masks, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype != torch.bool or g.shape != w.shape or not torch.equal(g, w):
            diff = int((g.to(torch.bool) != w).sum()) if g.shape == w.shape else -1
            raise CorrectnessError(f"{name}: mask {i} {tuple(w.shape)} differs from the reference in {diff} entries")


def select_backends(requested: Optional[str], device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """Backends to benchmark and, for requested ones that cannot run, the reason."""
    from bip_fast.ops import _dispatch

    skipped: Dict[str, str] = {}
    if requested:
        names = [b.strip() for b in requested.split(",") if b.strip()]
        out = []
        for b in names:
            if b not in _dispatch.BACKENDS:
                raise SystemExit(f"--backends: unknown backend {b!r}; expected some of {_dispatch.BACKENDS}")
            ok, reason = _dispatch.backend_status(b, device)
            if ok:
                out.append(b)
            else:
                skipped[b] = reason
        return out, skipped
    out = list(_dispatch.available_backends(device))
    if device.type == "cpu" and "triton" in out:
        # The Triton interpreter is a correctness tool; its timings mean nothing.
        out.remove("triton")
        skipped["triton"] = "Triton interpreter on CPU is not benchmarked by default (name it in --backends)"
    for b in _dispatch.BACKENDS:
        if b not in out and b not in skipped:
            ok, reason = _dispatch.backend_status(b, device)
            if not ok:
                skipped[b] = reason
    return out, skipped


# --------------------------------------------------------------------------------------------
# 1. top-K masks
# --------------------------------------------------------------------------------------------
def bench_topk(r: Runner, scores: List[torch.Tensor], backends: List[str], densities: Sequence[float],
               bw: Dict[str, Any]) -> None:
    from bip_fast import ops
    from bip_fast.ops import reference as ref

    n = sum(s.numel() for s in scores)
    base = f"{len(scores)} tensors N={_fmt_n(n)}"
    one_read_ms = n * 4 / (bw["read_gbs"] * 1e9) * 1e3
    r.add(C.Row("one read of scores", "sum() bandwidth", base, C.Timing(one_read_ms, one_read_ms, one_read_ms, 0, "derived"),
                metric=f"{bw['read_gbs']:.1f} GB/s read", metrics={"one_read_ms": one_read_ms}))

    def flat_abs() -> torch.Tensor:
        return torch.cat([s.reshape(-1) for s in scores]).abs_()

    t_sort = r.time(lambda: torch.sort(flat_abs(), descending=True), slow=True)
    r.add(C.Row("torch.sort (cat, desc)", "baseline", base + " any d", t_sort,
                metric=f"{t_sort.median_ms / one_read_ms:.1f} reads"))

    # First-digit histogram alone (the pass fused_sgd_ makes free).
    for b in backends:
        if b == "reference":
            continue
        try:
            h = ops.radix_histogram(scores, backend=b)
            want = ref.radix_histogram_ref(scores, ref.D1_SHIFT, 12, 0, 31)
            if not torch.equal(h.cpu(), want.cpu()):
                raise CorrectnessError(f"radix_histogram[{b}]: differs from the reference")
        except CorrectnessError:
            raise
        except Exception as e:
            r.error("radix_histogram (D1)", b, base, e)
            continue
        t = r.time(lambda: ops.radix_histogram(scores, backend=b))
        r.add(C.Row("radix_histogram (D1)", b, base, t, metric=f"{n * 4 / (t.median_ms * 1e-3) / 1e9:.1f} GB/s",
                    metrics={"gbs": n * 4 / (t.median_ms * 1e-3) / 1e9, "reads": t.median_ms / one_read_ms}))

    for d in densities:
        keep = ops.keep_count(n, d)
        cfg = f"{base} d={d:g}"
        t_kth = r.time(lambda: torch.kthvalue(flat_abs(), n - keep + 1), slow=True)
        r.add(C.Row("torch.kthvalue (cat)", "baseline", cfg, t_kth, metric=f"{t_kth.median_ms / one_read_ms:.1f} reads"))
        t_top = r.time(lambda: torch.topk(flat_abs(), keep, sorted=False), slow=True)
        r.add(C.Row("torch.topk (cat)", "baseline", cfg, t_top, metric=f"{t_top.median_ms / one_read_ms:.1f} reads"))

        want = ref.topk_masks_ref(scores, keep)
        if sum(int(m.sum()) for m in want) != keep:
            raise CorrectnessError(f"topk_masks_ref: {sum(int(m.sum()) for m in want)} True entries, expected {keep}")
        for b in backends:
            for with_hist in (False, True):
                if with_hist and b == "reference":
                    continue  # the reference ignores hist1
                op = "topk_masks + hist1" if with_hist else "topk_masks"
                slow = b == "reference" and not r.gpu
                try:
                    hist1 = ops.radix_histogram(scores, backend=b) if with_hist else None
                    # This call is also the warm-up of the slow CPU reference.
                    got = ops.topk_masks(scores, keep, hist1=hist1, backend=b)
                    _check_masks(f"{op}[{b}] {cfg}", got, want)
                    del got
                except CorrectnessError:
                    raise
                except Exception as e:
                    r.error(op, b, cfg, e)
                    continue
                t = r.time(lambda: ops.topk_masks(scores, keep, hist1=hist1, backend=b), slow=slow,
                           warmup=0 if slow else None)
                x_sort = t_sort.median_ms / t.median_ms
                x_kth = t_kth.median_ms / t.median_ms
                x_topk = t_top.median_ms / t.median_ms
                reads = t.median_ms / one_read_ms
                row = C.Row(op, b, cfg, t, metric=f"{x_sort:.1f}x sort, {x_kth:.1f}x kth, {reads:.1f} reads",
                            metrics={"speedup_vs_sort": x_sort, "speedup_vs_kthvalue": x_kth,
                                     "speedup_vs_topk": x_topk, "reads": reads, "keep": keep})
                if b != "reference":
                    if r.gpu:
                        row.add_target("x sort", x_sort, ">=", 20.0)
                        row.add_target("reads", reads, "<=", 3.0)
                    else:
                        row.add_target("x sort", x_sort, ">=", 3.0)
                        row.add_target("x kth", x_kth, ">=", 3.0)
                r.add(row)


# --------------------------------------------------------------------------------------------
# 2. fused SGD
# --------------------------------------------------------------------------------------------
def bench_sgd(r: Runner, weights: List[torch.Tensor], backends: List[str], bw: Dict[str, Any]) -> None:
    from bip_fast import ops
    from bip_fast.ops import reference as ref

    lr, mom, wd = 1e-3, 0.9, 1e-4
    dev = r.device
    g = torch.Generator().manual_seed(1)
    params0 = [w.to(dev) for w in weights]
    grads0 = [(torch.randn(w.shape, generator=g) * 1e-2).to(dev) for w in weights]
    bufs0 = [(torch.randn(w.shape, generator=g) * 1e-2).to(dev) for w in weights]
    n = sum(p.numel() for p in params0)
    nbytes = 5 * 4 * n
    cfg = f"{len(params0)} tensors N={_fmt_n(n)} fp32"

    def clone(ts):
        return [t.clone() for t in ts]

    def gbs(t: C.Timing) -> float:
        return nbytes / (t.median_ms * 1e-3) / 1e9

    # Baseline 1: the unfused _foreach sequence.
    P, G, B = clone(params0), clone(grads0), clone(bufs0)

    def foreach_step():
        torch._foreach_add_(G, P, alpha=wd)
        torch._foreach_mul_(B, mom)
        torch._foreach_add_(B, G)
        torch._foreach_add_(P, B, alpha=-lr)

    t_fe = r.time(foreach_step)
    r.add(C.Row("_foreach sequence", "baseline", cfg, t_fe,
                metric=f"{gbs(t_fe):.1f} GB/s ({100 * gbs(t_fe) / bw['copy_gbs']:.0f}%)",
                metrics={"gbs": gbs(t_fe), "pct_bw": 100 * gbs(t_fe) / bw["copy_gbs"]}))
    del P, G, B

    # Baseline 2: torch.optim.SGD (foreach, and fused where this torch has it).
    for variant in ("foreach", "fused"):
        try:
            ps = [torch.nn.Parameter(p.clone()) for p in params0]
            for p, gr in zip(ps, grads0):
                p.grad = gr.clone()
            opt = torch.optim.SGD(ps, lr=lr, momentum=mom, weight_decay=wd, **{variant: True})
            opt.step()  # creates the momentum buffers
        except Exception as e:
            if variant == "foreach":
                r.error("torch.optim.SGD", variant, cfg, e)
            continue
        t = r.time(opt.step)
        r.add(C.Row(f"torch.optim.SGD({variant}=True)", "baseline", cfg, t,
                    metric=f"{gbs(t):.1f} GB/s ({100 * gbs(t) / bw['copy_gbs']:.0f}%)",
                    metrics={"gbs": gbs(t), "pct_bw": 100 * gbs(t) / bw["copy_gbs"]}))
        del ps, opt

    for b in backends:
        for with_hist in (False, True):
            op = "fused_sgd_ + hist1" if with_hist else "fused_sgd_"
            try:
                P, G, B = clone(params0), clone(grads0), clone(bufs0)
                h = torch.zeros(4096, dtype=torch.int64, device=dev) if with_hist else None
                ops.fused_sgd_(P, G, B, lr, mom, wd, hist1=h, backend=b)
                RP, RG, RB = clone(params0), clone(grads0), clone(bufs0)
                ref.fused_sgd_ref_(RP, RG, RB, lr, mom, wd, None)
                for i in range(len(P)):
                    if _rel_err(P[i], RP[i]) > 1e-6 or _rel_err(B[i], RB[i]) > 1e-6 or not torch.equal(G[i], grads0[i]):
                        raise CorrectnessError(f"{op}[{b}]: tensor {i} {tuple(P[i].shape)} differs from fused_sgd_ref_")
                if with_hist:
                    want = ref.radix_histogram_ref(P, ref.D1_SHIFT, 12, 0, 31)
                    if not torch.equal(h.cpu(), want.cpu()):
                        raise CorrectnessError(f"{op}[{b}]: hist1 differs from the histogram of the updated params")
            except CorrectnessError:
                raise
            except Exception as e:
                r.error(op, b, cfg, e)
                continue
            if with_hist:
                def step(P=P, G=G, B=B, h=h):
                    h.zero_()
                    ops.fused_sgd_(P, G, B, lr, mom, wd, hist1=h, backend=b)
            else:
                def step(P=P, G=G, B=B):
                    ops.fused_sgd_(P, G, B, lr, mom, wd, backend=b)
            t = r.time(step, slow=b == "reference" and not r.gpu)
            x_fe = t_fe.median_ms / t.median_ms
            pct = 100 * gbs(t) / bw["copy_gbs"]
            row = C.Row(op, b, cfg, t, metric=f"{gbs(t):.1f} GB/s ({pct:.0f}%), {x_fe:.2f}x foreach",
                        metrics={"gbs": gbs(t), "pct_bw": pct, "speedup_vs_foreach": x_fe, "bytes": nbytes})
            if b != "reference":
                if r.gpu:
                    row.add_target("% bw", pct, ">=", 70.0)
                else:
                    row.add_target("x foreach", x_fe, ">", 1.0)
            r.add(row)
            del P, G, B


# --------------------------------------------------------------------------------------------
# 3. masked modules
# --------------------------------------------------------------------------------------------
def _module_configs(gpu: bool, quick: bool):
    """(kind, label, constructor args, input shape)."""
    if quick:
        return [("linear", "Linear 64->64 x[16,64]", (64, 64), (16, 64)),
                ("conv", "Conv 8->8 3x3 x[2,8,8,8]", (8, 8), (2, 8, 8, 8))]
    if gpu:
        return [("linear", "Linear 512->512 x[128,512]", (512, 512), (128, 512)),
                ("linear", "Linear 512->512 x[8192,512]", (512, 512), (8192, 512)),
                ("linear", "Linear 1024->1024 x[8192,1024]", (1024, 1024), (8192, 1024)),
                ("conv", "Conv 64->64 3x3 x[128,64,32,32]", (64, 64), (128, 64, 32, 32)),
                ("conv", "Conv 128->128 3x3 x[128,128,16,16]", (128, 128), (128, 128, 16, 16))]
    # The last two are ResNet-20 layers (stages 1 and 3) at the training batch of 128.
    return [("linear", "Linear 512->512 x[128,512]", (512, 512), (128, 512)),
            ("conv", "Conv 64->64 3x3 x[16,64,16,16]", (64, 64), (16, 64, 16, 16)),
            ("conv", "Conv 16->16 3x3 x[128,16,32,32]", (16, 16), (128, 16, 32, 32)),
            ("conv", "Conv 64->64 3x3 x[128,64,8,8]", (64, 64), (128, 64, 8, 8))]


def _time_interleaved(r: Runner, calls: List[Callable[[], Any]]) -> List[C.Timing]:
    """Time several calls against each other. On a GPU each gets its own C.bench (CUDA events,
    independent of host state). On a CPU they run interleaved, one call of each per round, so
    all see the same allocator, cache and frequency state (a CPU layer's time can jump 2x between
    runs with the allocator's page-fault behaviour; interleaving keeps the ratios honest)."""
    if r.gpu:
        return [r.time(c) for c in calls]
    for c in calls:  # warm-up
        for _ in range(max(r.args.warmup, 1)):
            c()
    samples: List[List[float]] = [[] for _ in calls]
    for _ in range(r.args.repeats):
        for i, c in enumerate(calls):
            t0 = time.perf_counter()
            c()
            samples[i].append((time.perf_counter() - t0) * 1e3)
    return [C.Timing.from_samples(xs, "perf_counter, interleaved") for xs in samples]


def bench_modules(r: Runner, backends: List[str], quick: bool) -> None:
    from bip_fast import ops
    from bip_fast.nn import MaskedConv2d, MaskedLinear

    dev = r.device
    if r.gpu:
        torch.backends.cudnn.benchmark = True
    # Triton GEMMs may use TF32; the dense baseline follows torch's own setting.
    tol = 1e-2 if r.gpu else 1e-5
    for kind, label, (cin, cout), xshape in _module_configs(r.gpu, quick):
        torch.manual_seed(2)
        if kind == "linear":
            dense = torch.nn.Linear(cin, cout, device=dev)
            masked = MaskedLinear(cin, cout, device=dev)
        else:
            dense = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False, device=dev)
            masked = MaskedConv2d(cin, cout, 3, padding=1, bias=False, device=dev)
        with torch.no_grad():
            masked.weight.copy_(dense.weight)
            masked.scores.copy_(dense.weight)
            if dense.bias is not None:
                masked.bias.copy_(dense.bias)
            keep = ops.keep_count(masked.weight.numel(), 0.1)
            masked.set_mask(ops.topk_masks([masked.scores], keep, backend="reference")[0])
        masked.ig_scale = 1.0
        x = torch.randn(xshape, device=dev, requires_grad=True)
        with torch.no_grad():
            gy = torch.randn_like(dense(x))

        def fwd_bwd(mod):
            mod.zero_grad(set_to_none=True)
            x.grad = None
            y = mod(x)
            y.backward(gy)
            return y

        # Reference results (the spec) on the same inputs.
        masked.backend = "reference"
        y_ref = fwd_bwd(masked).detach().clone()
        want = {"out": y_ref, "x.grad": x.grad.clone(), "weight.grad": masked.weight.grad.clone(),
                "scores.grad": masked.scores.grad.clone()}
        if masked.bias is not None:
            want["bias.grad"] = masked.bias.grad.clone()
        name = "MaskedLinear fwd+bwd" if kind == "linear" else "MaskedConv2d fwd+bwd"
        ok = []
        for b in backends:
            masked.backend = b
            try:
                y = fwd_bwd(masked)
                got = {"out": y, "x.grad": x.grad, "weight.grad": masked.weight.grad, "scores.grad": masked.scores.grad}
                if masked.bias is not None:
                    got["bias.grad"] = masked.bias.grad
                errs = {k: _rel_err(got[k], v) for k, v in want.items()}
            except Exception as e:
                r.error(name, b, label, e)
                continue
            bad = {k: e for k, e in errs.items() if not e <= tol}
            if bad:
                raise CorrectnessError(f"{name}[{b}] {label}: relative error vs reference {bad} > {tol:g}")
            ok.append((b, max(errs.values())))

        def run_backend(b):
            def call():
                masked.backend = b
                return fwd_bwd(masked)
            return call

        calls = [lambda: fwd_bwd(dense)] + [run_backend(b) for b, _ in ok]
        timings = _time_interleaved(r, calls)
        t_dense = timings[0]
        r.add(C.Row(f"nn.{'Linear' if kind == 'linear' else 'Conv2d'} fwd+bwd", "baseline", label, t_dense))
        for (b, err), t in zip(ok, timings[1:]):
            ratio = t.median_ms / t_dense.median_ms
            row = C.Row(name, b, label, t, metric=f"{ratio:.2f}x dense",
                        metrics={"ratio_vs_dense": ratio, "max_rel_err": err})
            if b != "reference":
                row.add_target("x dense", ratio, "<=", 1.10)
            r.add(row)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    p.add_argument("--json", default=None, help="result file (default benchmarks/results/kernels-<device>.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None,
                   help="comma list of reference,cpu,cuda,triton (default: every available backend; "
                        "on CPU the Triton interpreter only when named)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--densities", default="0.1,0.5", help="top-K densities (kept fraction)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (max)")
    p.add_argument("--slow-repeats", type=int, default=None, help="timed calls for slow baselines (max)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per measurement")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    defaults = {  # (quick, cpu, gpu)
        "repeats": (3, 15, 100),
        "slow_repeats": (2, 3, 20),
        "warmup": (1, 2, 3),
        "max_seconds": (0.5, 2.0, 2.0),
    }
    for k, (q, c, g) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else (g if gpu else c))
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    for s in a.sections:
        if s not in SECTIONS:
            p.error(f"--sections: unknown section {s!r}; expected some of {SECTIONS}")
    try:
        a.densities = [float(x) for x in a.densities.split(",") if x.strip()]
    except ValueError:
        p.error(f"--densities: expected comma-separated floats, got {a.densities!r}")
    if not a.densities or not all(0.0 < d < 1.0 for d in a.densities):
        p.error(f"--densities: expected values in (0, 1), got {a.densities}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    env = C.environment(device)
    print(C.format_header(env, "bip_fast kernel benchmarks" + (" (--quick)" if args.quick else "")))
    print(flush=True)

    backends, skipped = select_backends(args.backends, device)
    for b, why in skipped.items():
        C.log(f"kernels: backend {b!r} not benchmarked: {why}")

    weights, shapes_from = resnet18_weights(args.seed)
    if args.quick:
        weights = shrink(weights)
    scores = [w.to(device) for w in weights]
    runner = Runner(args, device)

    C.log("kernels: measuring bandwidth")
    bw = C.measure_bandwidth(device, 2**24 if args.quick else None, repeats=5 if args.quick else 20)
    runner.add(C.Row("bandwidth: copy_", "torch", f"{bw['bytes'] / 2**20:.0f} MiB", C.Timing(**bw["copy_ms"]),
                     metric=f"{bw['copy_gbs']:.1f} GB/s (read+write)"))
    runner.add(C.Row("bandwidth: sum()", "torch", f"{bw['bytes'] / 2**20:.0f} MiB", C.Timing(**bw["sum_ms"]),
                     metric=f"{bw['read_gbs']:.1f} GB/s (read)"))

    if "topk" in args.sections:
        C.log("kernels: topk_masks")
        bench_topk(runner, scores, backends, args.densities, bw)
    if "sgd" in args.sections:
        C.log("kernels: fused_sgd_")
        bench_sgd(runner, weights, backends, bw)
    if "modules" in args.sections:
        C.log("kernels: masked modules")
        bench_modules(runner, backends, args.quick)

    elapsed = time.perf_counter() - t_start
    print(C.markdown_table(runner.rows))
    print()
    judged = [r for r in runner.rows if r.passed is not None]
    print(f"targets: {sum(1 for r in judged if r.passed)}/{len(judged)} pass; "
          f"backends {', '.join(backends) or 'none'}; {elapsed:.0f} s")
    for b, why in skipped.items():
        print(f"not benchmarked: {b}: {why}")
    for e in runner.errors:
        print(f"error: {e['op']} [{e['backend']}] {e['config']}: {e['error']}")

    path = args.json or os.path.join(C.RESULTS_DIR, f"kernels-{C.device_slug(device)}.json")
    config = {
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "quick": args.quick,
        "device": args.device,
        "backends": backends,
        "skipped_backends": skipped,
        "sections": args.sections,
        "densities": args.densities,
        "repeats": args.repeats,
        "slow_repeats": args.slow_repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "seed": args.seed,
        "shapes_from": shapes_from,
        "shapes": [list(w.shape) for w in weights],
        "numel": sum(w.numel() for w in weights),
        "sgd": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "bytes_per_element": 20},
        "modules": [{"kind": k, "label": l, "channels": list(c), "input": list(s)}
                    for k, l, c, s in _module_configs(device.type == "cuda", args.quick)],
        "baselines_note": "sort/kthvalue/topk baselines time cat + abs + the call, not mask construction",
    }
    C.write_json(path, benchmark="kernels", env=env, config=config, rows=runner.rows,
                 extra={"bandwidth": bw, "errors": runner.errors, "elapsed_s": elapsed})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
