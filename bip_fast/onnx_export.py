"""ONNX files of finalized or compacted models, checked with ONNX Runtime.

:func:`export_onnx` writes a plain model (a :func:`bip_fast.compact` result, a
:func:`bip_fast.finalize` d model, or any nn.Module made of stock layers) as one ``.onnx`` file,
graph and weights together, the batch dimension dynamic. A model that still holds bip_fast masked
layers is finalized on a copy first (the caller's model is unchanged): its masked forward calls
bip_fast's own ops, which no ONNX runtime knows, and what a user exporting a pruned model wants is
the network with the masks' zeros baked in, as ``export`` writes ``model_dense_format.pt``.

Exporter: torch's own, ``torch.onnx.export(..., dynamo=True)`` (torch.export captures the graph,
onnxscript translates it). It is torch's default since 2.9, the TorchScript exporter
(``dynamo=False``) is deprecated, and it exports every model tested here (CIFAR ResNets with
their channel-padding shortcuts, torchvision ResNet-18 compacted, the transformer example with
``nn.MultiheadAttention`` and a key padding mask) with ONNX Runtime outputs within 1e-6 of the
output scale. A model it cannot export raises :class:`OnnxExportError` with the exporter's
first line; there is no fallback to the TorchScript exporter (no silent fallbacks). Only
arguments present in torch 2.11 and 2.13 are used: ``args``, ``kwargs``, ``dynamo``,
``dynamic_shapes``, ``output_names``, ``verbose``, and ``ONNXProgram.model_proto``. The file is
that proto serialised (weights inside, no ``.data`` side file; protobuf limits it to 2 GiB),
written to a temporary name, fsynced and renamed, so a failed export leaves nothing behind.

Check (``check=True``, the default): ONNX Runtime's CPU provider loads the bytes written and
runs ``example_inputs``; every output must be within ``rtol`` x the output scale (the largest
absolute output of the PyTorch model, in eval mode) of the PyTorch model's, else ValueError
naming the difference, and nothing is written.

Optional dependencies: ``onnx`` and ``onnxscript`` (the exporter) and ``onnxruntime`` (the
check) are imported inside the functions only, so ``import bip_fast`` never imports them; a
missing one raises :class:`OnnxExportError` naming it before any work.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .files.checkpoint import _check_path, _write_atomic
from .masks.group_trace import output_tensors
from .nn import finalize

__all__ = ["export_onnx", "onnx_bytes", "write_onnx", "require_onnx", "OnnxExportError", "ONNX_PACKAGES"]

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class OnnxExportError(RuntimeError):
    """No checked ONNX file could be made: an optional package is missing, the exporter failed,
    or ONNX Runtime could not load or run the result."""


def require_onnx(check: bool = True) -> None:
    """Raise :class:`OnnxExportError` unless the exporter's packages (and, with ``check``,
    onnxruntime) are installed; imports nothing."""
    need = ONNX_PACKAGES if check else ONNX_PACKAGES[:2]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(f"export_onnx: needs the optional packages {', '.join(need)}; not installed: "
                              f"{', '.join(missing)} (pip install {' '.join(missing)})")


def _split(example_inputs) -> Tuple[tuple, Dict[str, object]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"example_inputs: expected a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


def _output_names(out) -> List[str]:
    n = len(output_tensors(out))
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()):
        return list(out)
    return [f"output_{i}" for i in range(n)]


def _dynamic_shapes(args: tuple, kwargs: Dict[str, object]):
    """Dimension 0 of every tensor input is one shared dynamic ``batch``."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def spec(a):
        return {0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] < 2:
            raise ValueError("example_inputs: a batch dimension of at least 2 is needed for a dynamic batch "
                             f"(torch.export fixes a size-1 dimension), got shape {tuple(a.shape)}; pass a larger "
                             "batch or dynamic_batch=False")
    return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


@torch.no_grad()
def _reference(model: nn.Module, args: tuple, kwargs: Dict[str, object]):
    was = model.training
    model.eval()
    try:
        return model(*args, **kwargs)
    finally:
        model.train(was)


def _run_onnxruntime(data: bytes, feeds: Sequence[torch.Tensor]) -> List:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the check says what went wrong
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        if len(names) != len(feeds):
            raise OnnxExportError(f"export_onnx: the ONNX graph takes {len(names)} inputs ({', '.join(names)}), "
                                  f"example_inputs hold {len(feeds)} tensors")
        return sess.run(None, {n: t.numpy() for n, t in zip(names, feeds)})
    except OnnxExportError:
        raise
    except Exception as e:  # onnxruntime's own error types: reported in one line
        raise OnnxExportError(f"export_onnx: ONNX Runtime could not run the exported graph: {_first_line(e)}") from e


def onnx_bytes(model: nn.Module, example_inputs, *, check: bool = True, rtol: float = 1e-4,
               dynamic_batch: bool = True) -> Tuple[bytes, Dict[str, object]]:
    """The ONNX file of ``model`` (finalized on a copy if it holds masked layers) as bytes, checked
    with ONNX Runtime against ``model`` on ``example_inputs`` unless ``check=False``; and a report:
    opset, input / output names, parameters, ``max_abs_diff`` and ``output_scale`` of the check.
    :func:`export_onnx` writes these bytes; see the module notes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not rtol > 0:
        raise ValueError(f"rtol: expected > 0, got {rtol}")
    args, kwargs = _split(example_inputs)
    require_onnx(check)
    args_cpu, kwargs_cpu = _cpu(args), _cpu(kwargs)
    dynamic = _dynamic_shapes(args_cpu, kwargs_cpu) if dynamic_batch else None
    ref = _cpu(_reference(model, args, kwargs))
    plain = finalize(copy.deepcopy(model).cpu()).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notes about its internals, nothing to act on
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")  # the shared batch axis
            program = torch.onnx.export(plain, args_cpu, kwargs=kwargs_cpu or None, dynamo=True,
                                        dynamic_shapes=dynamic, output_names=_output_names(ref), verbose=False)
        proto = program.model_proto
        data = proto.SerializeToString()
    except Exception as e:  # the exporter's many error types (torch.export, onnxscript, protobuf): one line
        raise OnnxExportError(f"export_onnx: torch.onnx.export(dynamo=True) failed for {type(model).__name__}: "
                              f"{_first_line(e)}") from e
    rep: Dict[str, object] = {
        "exporter": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
        "opset": max((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
        "params": sum(p.numel() for p in plain.parameters()), "bytes": len(data),
        "dynamic_batch": bool(dynamic_batch)}
    if check:
        feeds = [t for t in list(args_cpu) + list(kwargs_cpu.values()) if isinstance(t, torch.Tensor)]
        got = _run_onnxruntime(data, feeds)
        want = output_tensors(ref)
        if len(got) != len(want) or any(tuple(g.shape) != tuple(w.shape) for g, w in zip(got, want)):
            raise ValueError(f"export_onnx: ONNX Runtime returned shapes {[tuple(g.shape) for g in got]}, the "
                             f"PyTorch model {[tuple(w.shape) for w in want]}")
        diff = max((float((torch.from_numpy(g).double() - w.double()).abs().max()) for g, w in zip(got, want)
                    if w.numel()), default=0.0)
        scale = max((float(w.double().abs().max()) for w in want if w.numel()), default=0.0)
        if not diff <= rtol * scale + 1e-12:  # NaN fails too
            raise ValueError(f"export_onnx: ONNX Runtime's outputs differ from the PyTorch model's by {diff:.3g} "
                             f"(output scale {scale:.3g}, allowed {rtol:g} x scale); the file was not written")
        rep.update(max_abs_diff=diff, output_scale=scale, rtol=rtol, checked_with="onnxruntime CPUExecutionProvider")
    return data, rep


def write_onnx(data: bytes, path) -> str:
    """``data`` to ``path`` atomically (temporary file, fsync, rename); returns the path."""
    _write_atomic((data,), _check_path(path))
    return str(path)


def export_onnx(model: nn.Module, example_inputs, path, *, check: bool = True, rtol: float = 1e-4,
                dynamic_batch: bool = True) -> Dict[str, object]:
    """Write ``model`` to ``path`` as ONNX, checked with ONNX Runtime (see the module notes)::

        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]

    ``model``: a compacted (:func:`bip_fast.compact`) or plain model; a masked one is finalized on a
    copy. ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs,
    with a batch dimension of at least 2 where ``dynamic_batch`` (dimension 0 of every tensor input
    becomes a shared ``batch`` axis). Returns :func:`onnx_bytes`' report with ``path``.

    Raises TypeError / ValueError for bad arguments and outputs that differ beyond ``rtol`` x the
    output scale; :class:`OnnxExportError` (a RuntimeError) when onnx, onnxscript or onnxruntime
    is missing or the model cannot be exported or run. Nothing is written then."""
    target = _check_path(path)
    data, rep = onnx_bytes(model, example_inputs, check=check, rtol=rtol, dynamic_batch=dynamic_batch)
    rep["path"] = write_onnx(data, target)
    return rep
