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
if ! "$VENV/bin/python" -c "import numpy, tqdm, yaml, matplotlib, scipy, pytest, xdist, hypothesis, ninja, setuptools, wheel, cmake, torch_pruning" 2>/dev/null; then
  "${PIP[@]}" install -q numpy tqdm pyyaml matplotlib scipy pytest pytest-xdist hypothesis ninja setuptools wheel cmake
  "${PIP[@]}" install -q --no-deps "torch-pruning>=1.5"  # no deps: it must not replace the torch above
fi
# Optional integrations the tests exercise (README, "Dependencies and why"): ONNX export checked by
# ONNX Runtime, TensorBoard logging, the Hugging Face example. None of them depends on torch.
if ! "$VENV/bin/python" -c "import onnx, onnxscript, onnxruntime, tensorboard, transformers" 2>/dev/null; then
  "${PIP[@]}" install -q onnx onnxscript onnxruntime tensorboard transformers
fi
# Build the extension (CPU kernels always; CUDA kernels where nvcc and a CUDA torch exist), only
# when something it is built from changed: the stamp is a hash of csrc/, setup.py, pyproject.toml,
# the torch version, nvcc and the build flags. A clean clone has no stamp and builds from scratch.
STAMP=build/ext.stamp
want=$( { find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum
          "$VENV/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda)"
          command -v nvcc || true
          echo "skip_ext=${BIP_FAST_SKIP_EXT:-} skip_cuda=${BIP_FAST_SKIP_CUDA:-} archs=${BIP_FAST_CUDA_ARCHS:-}"
        } | sha256sum | cut -d' ' -f1 )
built_here() {  # this checkout's bip_fast is the one installed, and its CPU kernels load
  "$VENV/bin/python" - "$PWD" <<'PYEOF' 2>/dev/null
import os, sys, bip_fast
here = os.path.realpath(os.path.join(sys.argv[1], "bip_fast"))
ok = os.path.realpath(os.path.dirname(bip_fast.__file__)) == here
ok = ok and (os.environ.get("BIP_FAST_SKIP_EXT") or bip_fast.build_info().get("cpu_loadable"))
sys.exit(0 if ok else 1)
PYEOF
}
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && built_here; then
  echo "bip_fast extension: up to date ($STAMP), not rebuilt"
else
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
  mkdir -p build && echo "$want" > "$STAMP"
fi
"$VENV/bin/python" -c "import json, bip_fast; print('bip_fast build_info:', json.dumps(bip_fast.build_info(), default=str))"
