"""Test configuration: Triton kernels run on the CPU interpreter where no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CIFAR_DIR = os.environ.get(
    "BIP_FAST_TEST_DATA",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"),
)


def pytest_report_header(config):
    import bip_fast

    info = bip_fast.build_info()
    return [f"bip_fast build_info: cpu={info.get('cpu_loadable')} cuda={info.get('cuda_loadable')} "
            f"triton={info.get('triton_version')} cuda_device={torch.cuda.is_available()}"]


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def cifar():
    """The real CIFAR-10, loaded once per test module (the test_data_* files)."""
    from _data_helpers import REAL
    from bip_fast.data import load_dataset

    if REAL is None:
        pytest.skip("real CIFAR-10 not found")
    return load_dataset("cifar10", data_dir=REAL, device="cpu", download=False)


@pytest.fixture(scope="module")
def triton_registered():
    """The Triton ops registered, once per test module (the test_triton_* files)."""
    from _triton_helpers import _OK, bt

    if _OK:
        bt.register()
