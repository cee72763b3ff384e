#!/usr/bin/env bash
# Creates ./.venv with the CUDA build of torch 2.13.0 (it also runs on a CPU), torchvision,
# triton and the test tools, then builds bip_fast with both kernel sets (CUDA when nvcc exists).
# Usage: bash scripts/setup_env.sh      (idempotent; VENV=path overrides the location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# --isolated: ignore any pip configuration that points at a CPU-only torch file.
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch, torchvision, triton, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "${PIP[@]}" install -q "torch==2.13.0" torchvision triton
fi
"${PIP[@]}" install -q numpy tqdm pyyaml matplotlib pytest pytest-xdist hypothesis ninja setuptools wheel cmake
# Build the extension (CPU kernels always; CUDA kernels where nvcc and a CUDA torch exist).
MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
"$VENV/bin/python" -c "import json, bip_fast; print('bip_fast build_info:', json.dumps(bip_fast.build_info(), default=str))"
