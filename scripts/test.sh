#!/usr/bin/env bash
# The test command: sets up ./.venv (scripts/setup_env.sh), builds and runs the C++ tests with
# CMake/ctest, then the whole Python suite. Triton kernels run on the CPU interpreter when no GPU
# is present; GPU-only tests are skipped there with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
# C++ tests (CPU kernels) through CMake + ctest.
BUILD=${CMAKE_BUILD_DIR:-build/cmake}
PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
PATH="$(dirname "$PY"):$PATH" cmake -S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release >/dev/null
PATH="$(dirname "$PY"):$PATH" cmake --build "$BUILD" -j 2 >/dev/null
(cd "$BUILD" && PATH="$(dirname "$PY"):$PATH" ctest --output-on-failure)
# Where nvcc and a CUDA build of torch exist, the CUDA kernels must compile even without a GPU.
if [ -z "${BIP_FAST_SKIP_CUDA:-}${BIP_FAST_SKIP_EXT:-}" ] && command -v nvcc >/dev/null 2>&1 \
   && "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  export BIP_FAST_REQUIRE_CUDA_BUILD=1
fi
export BIP_FAST_TEST_DATA=${BIP_FAST_TEST_DATA:-$(cd .. && pwd)/shared/data/cifar10}
"$PY" -m pytest -q -n 2 --dist loadfile tests "$@"
