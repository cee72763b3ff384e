"""scripts/gpu_check.sh, the one-call GPU validation, checked without a GPU.

The script's plan (--dry-run) must name every stage and run nothing: stub programs put first on
PATH record any call. A real run of the sanitizer stage against a stub compute-sanitizer
exercises the time-boxing, the status records, summary.md and the log tarball. Its helpers are
checked on their own: the summary renderer on hand-made logs, the CIFAR-10 subset writer on
synthetic batches, and scripts/ops_smoke.py on the CPU backends.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from _script_helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ["env", "build", "tests", "sanitizer", "kernels", "step", "speedup", "loader"]
BASH = shutil.which("bash") or "/bin/bash"
STUBBED = ("python", "python3", "nvidia-smi", "nvcc", "compute-sanitizer", "pip", "pip3", "ncu")


def _stub_bin(tmp_path, record):
    """A folder of programs that only append their command line to ``record`` and fail."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in STUBBED:
        p = d / name
        p.write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\nexit 1\n')
        p.chmod(0o755)
    return d


def _run(args, env_extra, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(env_extra)
    t0 = time.monotonic()
    r = subprocess.run([BASH, SCRIPT] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r, time.monotonic() - t0


def test_script_exists_and_parses():
    assert os.path.isfile(SCRIPT)
    r = subprocess.run([BASH, "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for helper in ("gpu_check_report", "ops_smoke", "cifar_subset"):
        path = os.path.join(ROOT, "scripts", f"{helper}.py")
        compile(open(path).read(), path, "exec")


def test_script_names_every_stage():
    text = open(SCRIPT).read()
    line = next(ln for ln in text.splitlines() if ln.startswith("ALL_STAGES="))
    assert line.split("=", 1)[1].strip('"').split() == STAGES
    for s in STAGES:
        assert f"stage_{s}() {{" in text, s


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, how):
    record = tmp_path / "calls.txt"
    stubs = _stub_bin(tmp_path, record)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}", "OUT": str(out),
           "GPU_CHECK_WORK": str(work), "PYTHON": str(stubs / "python3")}
    if how == "env":
        env["GPU_CHECK_DRY_RUN"] = "1"
    r, seconds = _run(["--dry-run"] if how == "flag" else [], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert seconds < 10
    assert not record.exists(), record.read_text()  # no python, nvidia-smi, nvcc, pip ... was called
    assert not out.exists() and not work.exists()
    plan = r.stdout
    for s in STAGES:
        assert f"stage {s} " in plan, s
    for needle in ("pip install -v -e . --no-build-isolation --no-deps", "MAX_JOBS=", "BIP_FAST_CUDA_ARCHS=",
                   "-m pytest tests", "--junitxml=", "--timeout 120", "--tool memcheck", "--tool racecheck",
                   "scripts/ops_smoke.py --backends cuda", "benchmarks/kernels.py --device cuda",
                   "benchmarks/step.py --device cuda --models resnet20,resnet18,vgg16 --batch-size 128",
                   "--json"):
        assert needle in plan, needle
    assert "TRITON_INTERPRET" not in plan
    assert ("benchmarks/speedup.py --preset mid" in plan and "--resume" in plan) or "speedup: SKIP" in plan


def test_dry_run_finds_a_carried_subset_and_skips_without_data(tmp_path):
    data = tmp_path / "cifar"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (data / "cifar-10-batches-py" / f).write_bytes(b"")
    r, _ = _run(["--dry-run", "--stages", "speedup"], {"BIP_FAST_DATA": str(data), "OUT": str(tmp_path / "o")})
    assert r.returncode == 0, r.stderr
    assert f"--data-dir {data}" in r.stdout and "--max-minutes 2.25" in r.stdout
    # without any data (a copy of the script in a bare folder: no data/ and no ../shared)
    bare = tmp_path / "bare" / "repo"
    (bare / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, bare / "scripts" / "gpu_check.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("BIP_FAST_DATA",) and not k.startswith("GPU_CHECK_")}
    r = subprocess.run([BASH, str(bare / "scripts" / "gpu_check.sh"), "--dry-run", "--stages", "speedup"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "speedup: SKIP: no CIFAR-10 found" in r.stdout and "cifar_subset.py" in r.stdout


def test_bad_arguments_exit_2(tmp_path):
    for args in (["--stages", "build,nope"], ["--budget", "ten"], ["--frobnicate"]):
        r, _ = _run(args, {"OUT": str(tmp_path / "o"), "GPU_CHECK_WORK": str(tmp_path / "w")})
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert not (tmp_path / "o").exists()


def test_sanitizer_stage_with_a_stub_sanitizer(tmp_path):
    """A real (non-dry) run of one stage: records, summary.md and logs.tar.gz as it goes."""
    d = tmp_path / "bin"
    d.mkdir()
    stub = d / "compute-sanitizer"
    stub.write_text('#!/bin/sh\ncase "$*" in\n'
                    '  *racecheck*) echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)";'
                    ' exit 3 ;;\n'
                    '  *) echo "ops_smoke: all ops matched the reference"; echo "========= ERROR SUMMARY: 0 errors" ;;\n'
                    'esac\n')
    stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"PATH": f"{d}:{os.environ.get('PATH', '/usr/bin:/bin')}", "OUT": str(out), "GPU_CHECK_WORK": str(work),
           "PYTHON": sys.executable}
    r, seconds = _run(["--stages", "sanitizer"], env)
    assert r.returncode == 1, r.stdout + r.stderr  # racecheck failed
    assert seconds < 30
    rows = [ln.split("\t") for ln in (work / "status.tsv").read_text().splitlines()]
    assert [(x[0], x[1]) for x in rows] == [("sanitizer-memcheck", "ok"), ("sanitizer-racecheck", "FAIL"),
                                            ("sanitizer-memcheck-triton", "ok")]
    files = sorted(os.listdir(out))
    assert files == ["logs.tar.gz", "summary.md"], files
    summary = (out / "summary.md").read_text()
    assert "| sanitizer-racecheck | FAIL | 3 |" in summary
    assert "sanitizer-memcheck: ========= ERROR SUMMARY: 0 errors" in summary
    assert "## Last lines of sanitizer-racecheck (FAIL)" in summary
    assert summary in r.stdout  # printed last, for the device tool's output tail
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/sanitizer-memcheck.log" in names and "status.tsv" in names


def test_report_renders_junit_running_step_and_tables(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    (work / "status.tsv").write_text("build\tok\t0\t95\t200\tBIP_FAST_CUDA_ARCHS=9.0, MAX_JOBS=16\n"
                                     "tests\tTIMEOUT\t124\t200\t200\tper-test timeout 120s\n")
    (work / "current").write_text(f"kernels\t{int(time.time()) - 7}\t80\n")
    (work / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" '
        'skipped="1" time="12.5"><testcase classname="tests.test_ops" name="test_a"/>'
        '<testcase classname="tests.test_ops" name="test_b"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_ddp" name="test_c"><skipped message="needs 2 GPUs"/></testcase>'
        '<testcase classname="tests.test_ops" name="test_d"/></testsuite></testsuites>')
    (work / "build_info.json").write_text(json.dumps({"cuda_loadable": True, "cpu_loadable": True}))
    (work / "logs" / "env.log").write_text("env: gpu: NVIDIA H100 80GB HBM3, 9.0, 580.159.04, 81559 MiB\nnoise\n")
    (work / "logs" / "build.log").write_text("bip_fast build: _C_cuda: built\n")
    (work / "logs" / "tests.log").write_text("===== slowest 20 durations =====\n3.21s call tests/test_x.py::test_y\n")
    (work / "logs" / "step.log").write_text("# header\n| model | mode |\n|---|---|\n| resnet20 | dense |\n"
                                            "targets: 3/4 rows pass\n")
    report = load_script("gpu_check_report", "scripts")
    assert report.main(["--work", str(work), "--out", str(out), "--budget", "525",
                        "--start", str(int(time.time()) - 300)]) == 0
    s = (out / "summary.md").read_text()
    assert "| build | ok | 0 | 95 | 200 |" in s and "| tests | TIMEOUT | 124 |" in s
    assert "| kernels | RUNNING |" in s
    assert "- 4 tests: 2 passed, 1 failed, 0 errors, 1 skipped" in s
    assert "failure: tests.test_ops::test_b: assert 1 == 2" in s and "1 x needs 2 GPUs" in s
    assert "gpu: NVIDIA H100 80GB HBM3" in s and "_C_cuda: built" in s and '"cuda_loadable": true' in s
    assert "| resnet20 | dense |" in s and "- targets: 3/4 rows pass" in s
    assert "3.21s call tests/test_x.py::test_y" in s
    assert "## Kernels (benchmarks/kernels.py)" in s and "- did not run" in s


def _fake_cifar(folder, per_class):
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        data[:, 0] = np.array(labels, dtype=np.uint8)  # pixel 0 carries the label: order check
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": []}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def test_cifar_subset_writes_every_file_class_balanced(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fake_cifar(src, per_class=6)
    mod = load_script("cifar_subset", "scripts")
    assert mod.main(["--src", str(src), "--dst", str(dst), "--train", "100", "--test", "30"]) == 0
    assert (dst / "SUBSET.txt").is_file() and (dst / "cifar-10-batches-py" / "batches.meta").is_file()
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 30)]:
        with open(dst / "cifar-10-batches-py" / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        assert entry["data"].dtype == np.uint8 and entry["data"].shape == (n, 3072)
        labels = np.asarray(entry["labels"])
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        assert (entry["data"][:, 0] == labels).all()  # rows stay with their labels
    assert mod.main(["--src", str(src), "--dst", str(tmp_path / "x"), "--train", "101"]) == 2  # not a multiple of 5
    assert mod.main(["--src", str(src), "--dst", str(tmp_path / "y"), "--test", "70"]) == 2  # 7 per class > 6
    assert mod.main(["--src", str(tmp_path / "none"), "--dst", str(tmp_path / "z")]) == 2


def test_ops_smoke_on_cpu_backends():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ops_smoke.py"), "--device", "cpu",
                        "--backends", "cpu,reference"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    if r.returncode == 2 and "unavailable" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ops_smoke: all ops matched the reference" in r.stdout
    assert r.stdout.count(": ok (") == 10  # 5 cases x 2 backends
