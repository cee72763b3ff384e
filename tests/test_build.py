"""Build/loader checks: build_info() contract, op registration, import hygiene."""
import os
import subprocess
import sys

import pytest
import torch

import bip_fast
from bip_fast import _ext

OPS = ["radix_histogram", "topk_masks", "topk_masks_hist", "masked_weight",
       "masked_weight_backward", "fused_sgd_"]
SCHEMAS = {
    "radix_histogram": "bip_fast::radix_histogram(Tensor[] scores, int shift, int bits, "
                       "int prefix, int prefix_shift) -> Tensor",
    "topk_masks": "bip_fast::topk_masks(Tensor[] scores, int keep) -> Tensor[]",
    "topk_masks_hist": "bip_fast::topk_masks_hist(Tensor[] scores, int keep, Tensor hist1) "
                       "-> Tensor[]",
    "masked_weight": "bip_fast::masked_weight(Tensor theta, Tensor mask) -> Tensor",
    "masked_weight_backward": "bip_fast::masked_weight_backward(Tensor grad, Tensor theta, "
                              "Tensor mask, Tensor scores, float ig_scale, bool need_theta, "
                              "bool need_scores) -> (Tensor, Tensor)",
    "fused_sgd_": "bip_fast::fused_sgd_(Tensor(a!)[] params, Tensor[] grads, "
                  "Tensor(b!)[] momentum_buffers, float lr, float momentum, float weight_decay, "
                  "Tensor(c!)? hist1, Tensor? skip=None) -> ()",
}


def test_build_info_keys_and_types():
    info = _ext.build_info()
    for key in ["cpu_compiled", "cpu_loadable", "cuda_compiled", "cuda_loadable"]:
        assert isinstance(info[key], bool), key
    assert info["triton_version"] is None or isinstance(info["triton_version"], str)
    assert info["torch_version"] == str(torch.__version__)
    assert info["torch_cuda"] == torch.version.cuda
    assert isinstance(info["reasons"], dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info["reasons"].items())
    assert set(info["env"]) >= {"BIP_FAST_SKIP_EXT", "BIP_FAST_SKIP_CUDA"}
    # consistency: anything missing has a reason
    if not info["cpu_loadable"]:
        assert "cpu" in info["reasons"]
    if not info["cuda_loadable"]:
        assert "cuda" in info["reasons"]
    if info["triton_version"] is None:
        assert "triton" in info["reasons"]
    if info["cpu_loadable"]:
        assert info["cpu_compiled"]
    if info["cuda_loadable"]:
        assert info["cuda_compiled"] and info["cpu_loadable"]
    assert _ext.cpu_available() == info["cpu_loadable"]
    assert _ext.cuda_ext_available() == info["cuda_loadable"]
    assert _ext.load() == info["cpu_loadable"]  # idempotent, never raises


def test_cpp_ops_registered_with_exact_schemas():
    if not _ext.cpu_available():
        pytest.skip(f"bip_fast._C not loadable: {_ext.build_info()['reasons'].get('cpu')}")
    for name in OPS:
        packet = getattr(torch.ops.bip_fast, name)
        assert str(packet.default._schema) == SCHEMAS[name]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bip_fast::{name}", "CPU"), name


def test_fake_kernels_trace_under_fake_mode():
    if not _ext.cpu_available():
        pytest.skip("bip_fast._C not loadable")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xs = [torch.randn(4, 3), torch.randn(5)]
        ms = torch.ops.bip_fast.topk_masks(xs, 3)
        assert [m.shape for m in ms] == [x.shape for x in xs]
        assert all(m.dtype == torch.bool for m in ms)
        h = torch.ops.bip_fast.radix_histogram(xs, 19, 12, 0, 31)
        assert h.shape == (4096,) and h.dtype == torch.int64
        dt, gs = torch.ops.bip_fast.masked_weight_backward(
            xs[0], xs[0], ms[0], xs[0], 1.0, False, True)
        assert dt.shape == (0,) and gs.shape == (4, 3)
        assert torch.ops.bip_fast.masked_weight(xs[0], ms[0]).shape == (4, 3)
        h1 = torch.zeros(4096, dtype=torch.int64)
        assert [m.shape for m in torch.ops.bip_fast.topk_masks_hist(xs, 3, h1)] == [(4, 3), (5,)]
        assert torch.ops.bip_fast.fused_sgd_(xs, xs, xs, 0.1, 0.9, 0.0, h1) is None


def test_compiled_module_file_present_when_loadable():
    info = _ext.build_info()
    if info["cpu_loadable"]:
        import bip_fast._C as c

        assert os.path.exists(c.__file__)
    else:
        pytest.skip(f"CPU extension not built: {info['reasons'].get('cpu')}")


def test_import_ext_does_not_touch_cuda_or_triton():
    code = (
        "import sys, torch\n"
        "import bip_fast._ext as e\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert not torch.cuda.is_initialized()\n"
        "e.load()\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'triton' not in sys.modules, 'triton imported by load()'\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_setup_parses_cuda_archs():
    # setup.py's architecture parser, exercised without building anything
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = open(os.path.join(root, "setup.py")).read()
    ns = {}
    start = src.index("def parse_cuda_archs")
    end = src.index("def get_extensions")
    exec(src[start:end], ns)
    flags = ns["parse_cuda_archs"]("9.0;8.0+PTX")
    assert flags == ["-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_80,code=sm_80",
                     "-gencode=arch=compute_80,code=compute_80"]
    with pytest.raises(ValueError, match="BIP_FAST_CUDA_ARCHS"):
        ns["parse_cuda_archs"]("banana")


def test_load_never_raises_when_extension_unimportable():
    # Block bip_fast._C in a fresh interpreter: load() must record the reason, not raise.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('bip_fast._C', 'bip_fast._C_cuda'):\n"
        "            raise ImportError('blocked for test')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bip_fast._ext as e\n"
        "assert e.load() is False\n"
        "assert e.cpu_available() is False and e.cuda_ext_available() is False\n"
        "info = e.build_info()\n"
        "assert info['cpu_loadable'] is False and info['cuda_loadable'] is False\n"
        "assert 'cpu' in info['reasons'] and 'cuda' in info['reasons']\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_cuda_extension_built_when_required():
    """scripts/test.sh sets BIP_FAST_REQUIRE_CUDA_BUILD=1 where nvcc and a CUDA torch exist: there
    the CUDA kernels must have compiled and must import, even without a GPU."""
    if os.environ.get("BIP_FAST_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("BIP_FAST_REQUIRE_CUDA_BUILD is not set (no nvcc or no CUDA build of torch)")
    info = bip_fast.build_info()
    assert info["cuda_compiled"], info["reasons"]
    assert info["cuda_loadable"], info["reasons"]
    for op in ("topk_masks", "topk_masks_hist", "radix_histogram", "masked_weight",
               "masked_weight_backward", "fused_sgd_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bip_fast::{op}", "CUDA"), op
