#!/usr/bin/env bash
# GPU validation in one command: build, GPU tests, compute-sanitizer, kernel and step
# benchmarks, a short speedup run. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_check.sh                  # all stages, inside GPU_CHECK_BUDGET (525 s)
#   bash scripts/gpu_check.sh --dry-run        # print the plan; builds and runs nothing
#   bash scripts/gpu_check.sh --stages build,tests
#
# Stages (each time-boxed with `timeout`, each inside what is left of one overall budget, each
# writing its results as it finishes, so one that overruns still leaves the others' results):
#   env        GPU, driver, toolchain and package versions
#   build      pip install -e . for the local GPU's architecture only (BIP_FAST_CUDA_ARCHS from
#              nvidia-smi or torch, MAX_JOBS = cores); then bip_fast.build_info()
#   tests      the whole pytest suite on the GPU (no TRITON_INTERPRET), per-test timeout when
#              pytest-timeout is installed, junit XML
#   sanitizer  compute-sanitizer memcheck and racecheck over scripts/ops_smoke.py (every CUDA op
#              once on small shapes), then memcheck over the Triton ops if time is left
#   kernels    benchmarks/kernels.py --device cuda (top-k, fused SGD, masked modules)
#   step       benchmarks/step.py at batch 128 on ResNet-20, ResNet-18, VGG-16
#   speedup    benchmarks/speedup.py --preset mid --max-minutes <=2.5 --resume, when CIFAR-10 is
#              found (a subset in data/cifar10-gpu, written by scripts/cifar_subset.py and copied
#              along with the checkout: the whole set does not travel); else skipped
#   loader     benchmarks/loader.py --decode both: FolderLoader with PIL in 8 workers and with
#              decode_jpeg on the GPU, against torchvision's ImageFolder, 512 generated JPEGs
#
# Output in $OUT (./gpu-results when OUT is unset): summary.md, kernels.json, step.json,
# speedup.json, time_vs_sparsity.png, accuracy_vs_sparsity.png, loader.json, logs.tar.gz (every log, the
# junit XML, build_info.json). Work files stay in $GPU_CHECK_WORK (build/gpu-check, ignored), so a
# second run on the same machine resumes the speedup run and rebuilds incrementally.
#
# Environment: OUT, PYTHON (python3), GPU_CHECK_BUDGET (seconds, 525), GPU_CHECK_STAGES,
# GPU_CHECK_WORK, GPU_CHECK_DRY_RUN=1, GPU_CHECK_TEST_WORKERS, GPU_CHECK_PER_TEST_TIMEOUT (120),
# GPU_CHECK_SPEEDUP_ARGS ("--preset mid"), BIP_FAST_CUDA_ARCHS (else detected), BIP_FAST_DATA.
# Exit status: 0 when every stage that ran passed, 1 otherwise, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

ALL_STAGES="env build tests sanitizer kernels step speedup loader"
DRY=${GPU_CHECK_DRY_RUN:-0}
STAGES=${GPU_CHECK_STAGES:-$ALL_STAGES}
BUDGET=${GPU_CHECK_BUDGET:-525}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --stages) STAGES=${2:-}; shift ;;
    --stages=*) STAGES=${1#--stages=} ;;
    --budget) BUDGET=${2:-}; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] || [ "$DRY" = 0 ] || DRY=1
STAGES=${STAGES//,/ }
for s in $STAGES; do
  case " $ALL_STAGES " in *" $s "*) ;; *) echo "gpu_check: unknown stage '$s'; stages: $ALL_STAGES" >&2; exit 2 ;; esac
done
case $BUDGET in ''|*[!0-9]*) echo "gpu_check: --budget: expected whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-./gpu-results}
WORK=${GPU_CHECK_WORK:-build/gpu-check}
LOGS=$WORK/logs
START=$(date +%s)
FINAL_RESERVE=15      # seconds kept for the last summary and the log tarball
PER_TEST=${GPU_CHECK_PER_TEST_TIMEOUT:-120}
SPEEDUP_ARGS=${GPU_CHECK_SPEEDUP_ARGS:---preset mid}
JOBS=$(nproc 2>/dev/null || echo 4)
# Per stage: the most seconds it may take, and the least that earlier stages must leave it.
declare -A CAP=([env]=30 [build]=200 [tests]=200 [sanitizer]=130 [kernels]=75 [step]=75 [speedup]=180 [loader]=50)
declare -A MIN=([env]=0 [build]=0 [tests]=60 [sanitizer]=30 [kernels]=40 [step]=40 [speedup]=90 [loader]=30)
FAILED=0

unset TRITON_INTERPRET                     # Triton runs compiled on the GPU, never interpreted
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi

say() { echo "gpu_check: $*"; }
selected() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# Seconds stage $1 may take: its cap, less what the later selected stages need at least.
stage_timeout() {
  local stage=$1 reserve=$FINAL_RESERVE later=0 s t
  for s in $ALL_STAGES; do
    if [ "$later" = 1 ] && selected "$s"; then reserve=$(( reserve + ${MIN[$s]} )); fi
    [ "$s" = "$stage" ] && later=1
  done
  t=$(( $(remaining) - reserve ))
  [ "$t" -gt "${CAP[$stage]}" ] && t=${CAP[$stage]}
  echo "$t"
}

record() {  # record NAME STATUS RC SECONDS TIMEOUT NOTE
  [ "$DRY" = 1 ] && return 0
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >>"$WORK/status.tsv"
  case $2 in ok|SKIP) ;; *) FAILED=1 ;; esac
}

skip() {  # skip NAME REASON
  say "$1: SKIP: $2"
  record "$1" SKIP - 0 - "$2"
}

render() {  # summary.md and logs.tar.gz in $OUT_DIR, rewritten after every step
  [ "$DRY" = 1 ] && return 0
  "$PY" scripts/gpu_check_report.py --work "$WORK" --out "$OUT_DIR" --budget "$BUDGET" --start "$START" \
    --stages "$STAGES" >/dev/null 2>>"$LOGS/report.log" || say "summary rendering failed (see logs/report.log)"
  tar -czf "$OUT_DIR/logs.tar.gz.tmp" -C "$WORK" --exclude='*.pt' --exclude=ckpt --exclude=speedup-cache \
    --ignore-failed-read logs status.tsv $(cd "$WORK" && ls -d junit.xml build_info.json kernels.json \
    step.json loader.json speedup 2>/dev/null) 2>/dev/null && mv -f "$OUT_DIR/logs.tar.gz.tmp" "$OUT_DIR/logs.tar.gz"
}

# run_step NAME TIMEOUT SIGNAL CMD...: runs CMD under `timeout`, output to $LOGS/NAME.log.
run_step() {
  local name=$1 t=$2 sig=$3 log="$LOGS/$1.log" t0 rc st dt
  shift 3
  if [ "$DRY" = 1 ]; then
    printf '    [%s] timeout %ss: %s\n' "$name" "$t" "${SHOW:-$*}"
    NOTE=""
    return 0
  fi
  if [ "$t" -lt 10 ]; then
    skip "$name" "no time left in the ${BUDGET}s budget"
    return 124
  fi
  printf '%s\t%s\t%s\n' "$name" "$(date +%s)" "$t" >"$WORK/current"
  render
  say "$name: running (timeout ${t}s): $*"
  { echo "\$ $*"; echo "# timeout ${t}s, started $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$log"
  t0=$(date +%s)
  timeout -s "$sig" -k 15 "$t" "$@" >>"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then st=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ "$dt" -ge "$t" ]; then
    st=TIMEOUT  # also a program that caught the signal and exited on its own (pytest: 2)
  else
    st=FAIL
  fi
  say "$name: $st (exit $rc, ${dt}s)"
  record "$name" "$st" "$rc" "$dt" "$t" "${NOTE:-}"
  rm -f "$WORK/current"
  NOTE=""
  render
  return $rc
}

detect_arch() {  # compute capability of GPU 0, e.g. 9.0
  local cc=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' \r')
  fi
  case $cc in [0-9]*.[0-9]*) ;; *)
    cc=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null) ;;
  esac
  echo "$cc"
}

find_data() {  # a folder holding cifar-10-batches-py/ with every file load_dataset needs
  local d f ok
  for d in "${BIP_FAST_DATA:-}" data/cifar10-gpu data/cifar10 data shared/data/cifar10 ../shared/data/cifar10; do
    [ -n "$d" ] || continue
    ok=1
    for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
      [ -f "$d/cifar-10-batches-py/$f" ] || ok=0
    done
    if [ "$ok" = 1 ]; then echo "$d"; return 0; fi
  done
  return 1
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
           /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

# ------------------------------------------------------------------------------------ stages
# The env stage's probe: bash -c "$ENV_PROBE" env-probe PYTHON SANITIZER
read -r -d '' ENV_PROBE <<'SH'
py=$1 san=$2
echo "env: host: $(uname -r), $(nproc) cores"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | sed 's/^/env: gpu: /'
  nvidia-smi
else
  echo "env: gpu: nvidia-smi not found"
fi
echo "env: nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
echo "env: compute-sanitizer: $("$san" --version 2>/dev/null | grep -i version | head -n 1) ($san)"
"$py" - <<'EOF'
import importlib, platform, sys
print(f"env: python: {platform.python_version()} ({sys.executable})")
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"env: torch: {torch.__version__} (CUDA {torch.version.cuda}, device {gpu})")
except Exception as e:
    print(f"env: torch: import failed: {e!r}")
for mod in ("triton", "numpy", "pytest", "pytest_timeout", "xdist", "hypothesis", "torchvision",
            "matplotlib", "setuptools", "ninja"):
    try:
        m = importlib.import_module(mod)
        print(f"env: {mod}: {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"env: {mod}: missing ({type(e).__name__})")
EOF
SH

stage_env() {
  SHOW="bash -c <versions of the GPU, driver, nvcc, compute-sanitizer, python packages>" \
    run_step env "$(stage_timeout env)" TERM bash -c "$ENV_PROBE" env-probe "$PY" "$(find_sanitizer || echo compute-sanitizer)"
}

stage_build() {
  local arch=${BIP_FAST_CUDA_ARCHS:-} t
  if [ "$DRY" = 1 ]; then
    arch=${arch:-<compute_cap>}  # detected at run time: nvidia-smi, else torch
  elif [ -z "$arch" ]; then
    arch=$(detect_arch)
  fi
  if [ -z "$arch" ]; then
    NOTE="no GPU architecture detected: setup.py's default list"
  else
    NOTE="BIP_FAST_CUDA_ARCHS=$arch, MAX_JOBS=$JOBS"
  fi
  t=$(stage_timeout build)
  run_step build "$t" TERM env ${arch:+BIP_FAST_CUDA_ARCHS="$arch"} MAX_JOBS="$JOBS" BIP_FAST_NVCC_THREADS=1 \
    "$PY" -m pip install -v -e . --no-build-isolation --no-deps --no-index
  local rc=$?
  if [ "$DRY" = 0 ] && [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then
    # pip itself can fail where the compilers work (read-only site-packages, old pip): build in place
    NOTE="fallback after pip failed; the checkout is on PYTHONPATH"
    run_step build-inplace "$(stage_timeout build)" TERM env ${arch:+BIP_FAST_CUDA_ARCHS="$arch"} \
      MAX_JOBS="$JOBS" BIP_FAST_NVCC_THREADS=1 "$PY" setup.py build_ext --inplace
  fi
  SHOW="$PY -c 'print(json.dumps(bip_fast.build_info()))' > $WORK/build_info.json" \
    run_step build_info 30 TERM "$PY" -c 'import json, sys, bip_fast
info = bip_fast.build_info()
text = json.dumps(info, indent=1, sort_keys=True, default=str)
open(sys.argv[1], "w").write(text + "\n")
print(text)' "$WORK/build_info.json"
}

stage_tests() {
  local t workers data args=() envs=()
  t=$(stage_timeout tests)
  workers=${GPU_CHECK_TEST_WORKERS:-$(( JOBS >= 16 ? 8 : (JOBS >= 4 ? JOBS / 2 : 1) ))}
  # SIGTERM from `timeout` becomes KeyboardInterrupt: pytest stops as on Ctrl-C and still writes
  # the junit XML of the tests that ran (a plain SIGINT may be ignored in a background job).
  args=(-c 'import signal, sys, pytest
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))'
        tests -v -ra --durations=20 -p no:cacheprovider --junitxml="$WORK/junit.xml" -o junit_family=xunit2)
  if [ "$DRY" = 1 ] || "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    args+=(--timeout "$PER_TEST")
    NOTE="per-test timeout ${PER_TEST}s"
  else
    NOTE="pytest-timeout not installed: only the stage timeout"
  fi
  if [ "$workers" -gt 1 ] && { [ "$DRY" = 1 ] || "$PY" -c 'import xdist' 2>/dev/null; }; then
    args+=(-n "$workers" --dist loadfile)
    NOTE="$NOTE; $workers xdist workers"
  fi
  envs=(-u BIP_FAST_DATA OMP_NUM_THREADS=$(( JOBS / workers > 0 ? JOBS / workers : 1 )))
  if [ "$DRY" = 1 ] || command -v nvcc >/dev/null 2>&1; then
    envs+=(BIP_FAST_REQUIRE_CUDA_BUILD=1)  # as scripts/test.sh: with nvcc the CUDA build must exist
  fi
  if data=$(find_data); then
    envs+=(BIP_FAST_TEST_DATA="$data")
    # tests/test_data_cifar.py checks the whole set's shapes under BIP_FAST_DATA: only for the whole set
    [ -f "$data/SUBSET.txt" ] || envs+=(BIP_FAST_DATA="$data")
    NOTE="$NOTE; CIFAR-10 from $data"
  else
    envs+=(BIP_FAST_TEST_DATA=/nonexistent)
    NOTE="$NOTE; no CIFAR-10: real-data tests skip"
  fi
  SHOW="env ${envs[*]} $PY -m pytest ${args[*]:2}" run_step tests "$t" TERM env "${envs[@]}" "$PY" "${args[@]}"
}

stage_sanitizer() {
  local san t0 t
  if ! san=$(find_sanitizer); then
    if [ "$DRY" = 1 ]; then san=compute-sanitizer; else skip sanitizer "compute-sanitizer not found"; return; fi
  fi
  t0=$(date +%s)
  t=$(stage_timeout sanitizer)
  # No caching allocator: each tensor is its own cudaMalloc, so an overrun past it is caught.
  local base=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --error-exitcode 3 --print-limit 100)
  NOTE="CUDA ops of scripts/ops_smoke.py"
  run_step sanitizer-memcheck "$(( t / 2 ))" TERM "${base[@]}" --tool memcheck \
    "$PY" scripts/ops_smoke.py --backends cuda
  local used=$(( $(date +%s) - t0 ))
  NOTE="CUDA ops of scripts/ops_smoke.py"
  run_step sanitizer-racecheck "$(( (t - used) * 2 / 3 ))" TERM "${base[@]}" --tool racecheck \
    "$PY" scripts/ops_smoke.py --backends cuda
  used=$(( $(date +%s) - t0 ))
  if [ "$DRY" = 1 ] || [ $(( t - used )) -ge 40 ]; then
    NOTE="Triton ops of scripts/ops_smoke.py"
    run_step sanitizer-memcheck-triton "$(( t - used ))" TERM "${base[@]}" --tool memcheck \
      "$PY" scripts/ops_smoke.py --backends triton
  else
    skip sanitizer-memcheck-triton "under 40 s left of the stage's ${t}s"
  fi
}

stage_kernels() {
  run_step kernels "$(stage_timeout kernels)" TERM "$PY" benchmarks/kernels.py --device cuda \
    --max-seconds 1.0 --json "$WORK/kernels.json"
  [ "$DRY" = 1 ] || { [ -f "$WORK/kernels.json" ] && cp -f "$WORK/kernels.json" "$OUT_DIR/"; }
}

stage_step() {
  run_step step "$(stage_timeout step)" TERM "$PY" benchmarks/step.py --device cuda \
    --models resnet20,resnet18,vgg16 --batch-size 128 --json "$WORK/step.json"
  [ "$DRY" = 1 ] || { [ -f "$WORK/step.json" ] && cp -f "$WORK/step.json" "$OUT_DIR/"; }
}

stage_speedup() {
  local data t minutes png
  if ! data=$(find_data); then
    skip speedup "no CIFAR-10 found (BIP_FAST_DATA, data/cifar10-gpu, data/cifar10, data, shared/data/cifar10): write a subset with 'python3 scripts/cifar_subset.py' and copy data/cifar10-gpu along with the checkout"
    return
  fi
  t=$(stage_timeout speedup)
  if [ "$t" -lt 75 ]; then
    skip speedup "only ${t}s left of the budget (needs 75)"
    return
  fi
  # --max-minutes stops at the next epoch boundary after it; 45 s cover start-up, the last epoch
  # and the report
  minutes=$(awk -v t="$t" 'BEGIN { m = (t - 45) / 60; if (m > 2.5) m = 2.5; printf "%.2f", m }')
  NOTE="data $data$([ -f "$data/SUBSET.txt" ] && echo ' (subset)'); --max-minutes $minutes"
  # shellcheck disable=SC2086  # SPEEDUP_ARGS holds several words on purpose
  run_step speedup "$t" TERM "$PY" benchmarks/speedup.py $SPEEDUP_ARGS --device cuda --resume \
    --max-minutes "$minutes" --data-dir "$data" --out "$WORK/speedup" --cache-dir "$WORK/speedup-cache" \
    --json "$WORK/speedup/speedup.json"
  if [ "$DRY" = 0 ]; then
    [ -f "$WORK/speedup/speedup.json" ] && cp -f "$WORK/speedup/speedup.json" "$OUT_DIR/"
    for png in time_vs_sparsity.png accuracy_vs_sparsity.png; do
      [ -f "$WORK/speedup/$png" ] && cp -f "$WORK/speedup/$png" "$OUT_DIR/"
    done
  fi
  return 0
}

stage_loader() {
  run_step loader "$(stage_timeout loader)" TERM "$PY" benchmarks/loader.py --device cuda --decode both \
    --images 512 --batch-size 64 --workers 8 --repeats 3 --json "$WORK/loader.json"
  [ "$DRY" = 1 ] || { [ -f "$WORK/loader.json" ] && cp -f "$WORK/loader.json" "$OUT_DIR/"; }
}

# ------------------------------------------------------------------------------------ main
find_data >/dev/null || MIN[speedup]=0  # nothing to keep time for: the stage will skip
if [ "$DRY" = 1 ]; then
  say "dry run: nothing is built or run"
  say "plan: stages [$STAGES] of [$ALL_STAGES], budget ${BUDGET}s, python '$PY', $JOBS cores"
  say "output: $OUT_DIR (summary.md, kernels.json, step.json, speedup.json, 2 PNG, loader.json, logs.tar.gz); work: $WORK"
  if data=$(find_data); then say "CIFAR-10: $data"; else say "CIFAR-10: not found here: the speedup stage would skip"; fi
  caps=0; for s in $STAGES; do caps=$(( caps + ${CAP[$s]} )); done
  say "timeouts below are caps (sum ${caps}s); at run time each step gets at most what is left of the budget, less the minimum kept for the later stages"
else
  mkdir -p "$OUT_DIR" "$LOGS" || exit 2
  rm -f "$WORK/status.tsv" "$WORK/current"
  say "stages [$STAGES], budget ${BUDGET}s, output $OUT_DIR, work $WORK"
fi
for s in $ALL_STAGES; do
  selected "$s" || continue
  if [ "$DRY" = 1 ]; then say "stage $s (cap ${CAP[$s]}s, at least ${MIN[$s]}s kept for it):"; fi
  "stage_$s"
done
[ "$DRY" = 1 ] && { say "dry run done"; exit 0; }
render
echo
cat "$OUT_DIR/summary.md" 2>/dev/null || say "no summary.md (see $LOGS/report.log)"
say "finished in $(( $(date +%s) - START ))s; results in $OUT_DIR"
exit "$FAILED"
