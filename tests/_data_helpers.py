"""Where the real CIFAR-10 is, and the mark for tests that need it (test_data_* files and conftest)."""
import os
from pathlib import Path

import pytest


_SHARED = Path("/work/shared/data/cifar10")


def _real_cifar10_dir():
    for cand in (os.environ.get("BIP_FAST_DATA"), _SHARED, Path("data")):
        if cand and (Path(cand) / "cifar-10-batches-py" / "data_batch_1").is_file():
            return Path(cand)
    return None


REAL = _real_cifar10_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="real CIFAR-10 not found "
                                "(set BIP_FAST_DATA to the folder holding cifar-10-batches-py)")
