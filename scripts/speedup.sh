#!/usr/bin/env bash
# One command on a fresh machine: set up ./.venv (scripts/setup_env.sh), then run the end-to-end
# BiP vs IMP benchmark. Arguments go to benchmarks/speedup.py (e.g. --data-dir DIR, --preset mid).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" benchmarks/speedup.py "$@"
