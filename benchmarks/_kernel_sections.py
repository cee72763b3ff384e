"""The three sections of ``benchmarks/kernels.py``: top-K masks, fused SGD and masked modules, each
against the PyTorch baselines it replaces; every backend is checked against the reference first."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Sequence

import torch

try:  # imported as part of a package (python -m benchmarks.kernels)
    from . import _common as C
    from ._kernel_inputs import _fmt_n, _module_configs
    from ._kernel_runner import CorrectnessError, Runner, _check_masks, _rel_err, _time_interleaved
except ImportError:  # run as a script, or loaded from its file path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C  # type: ignore[no-redef]
    from _kernel_inputs import _fmt_n, _module_configs  # type: ignore[no-redef]
    from _kernel_runner import (  # type: ignore[no-redef]
        CorrectnessError, Runner, _check_masks, _rel_err, _time_interleaved)


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
