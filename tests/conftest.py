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
