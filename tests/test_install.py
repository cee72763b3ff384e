"""Installed like a library: a wheel built from a clean copy of the repository (its tracked files)
installs with pip into an empty folder, and imports from there with its compiled CPU kernels
loaded, in an interpreter that sees only that folder and the installed dependencies (no
checkout, no editable install). The source distribution carries the C++ sources. Takes about a
minute (the CPU kernels compile; CUDA is skipped with BIP_FAST_SKIP_CUDA=1)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

import bip_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the build reads; results, docs and tests are left out of the copy to keep it small.
LEFT_OUT = ("benchmarks/results/", "docs/", "tests/")


def _clean_copy(dst):
    """The repository's tracked (and new, not ignored) files as they are now: a clean clone of the
    working tree, without build outputs or compiled modules."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs git and a git checkout to list the repository's files")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = os.path.join(ROOT, rel)
        if rel.startswith(LEFT_OUT) or not os.path.isfile(src):
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("install") / "src"
    src.mkdir()
    _clean_copy(src)
    return src


def test_wheel_installs_and_loads_its_cpu_kernels(source, tmp_path):
    env = dict(os.environ, BIP_FAST_SKIP_CUDA="1", MAX_JOBS="1", OMP_NUM_THREADS="1")
    env.pop("BIP_FAST_SKIP_EXT", None)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-build-isolation", "--no-deps", "-q",
          "-w", str(wheels)], env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("bip_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("bip_fast/_C.") and n.endswith(".so") for n in names), names
    assert not any(n.startswith("bip_fast/_C_cuda") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"\nVersion: {bip_fast.__version__}\n" in meta and "\nLicense-Expression: MIT\n" in meta
    assert "\nRequires-Python: >=3.10\n" in meta and "\nRequires-Dist: torch>=2.4\n" in meta

    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target),
          str(wheel)], env=env, cwd=tmp_path)
    # -S: no site-packages processing, so neither an editable install of the checkout nor its .pth
    # files are seen; the dependencies come from this interpreter's site-packages, bip_fast from target.
    paths = [str(target)] + sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    check = ("import bip_fast, torch; info = bip_fast.build_info(); "
             "print(bip_fast.__file__); print(bip_fast.__version__); print(info['cpu_loadable']); "
             "print(bip_fast.ops.topk_masks([torch.tensor([3.0, 1.0, 2.0, 5.0])], 2, backend='cpu')[0].tolist())")
    run_env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    for k in ("BIP_FAST_SKIP_EXT", "BIP_FAST_SKIP_CUDA"):
        run_env.pop(k, None)
    lines = _run([sys.executable, "-S", "-c", check], env=run_env, cwd=tmp_path).stdout.splitlines()
    assert lines[0].startswith(str(target)), lines
    assert lines[1:] == [bip_fast.__version__, "True", "[True, False, False, True]"]


def test_sdist_carries_the_sources(source, tmp_path):
    r = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                                    "print(b.build_sdist(sys.argv[1]))", str(tmp_path)], cwd=source,
             env=dict(os.environ, BIP_FAST_SKIP_EXT="1"))
    with tarfile.open(tmp_path / r.stdout.strip().splitlines()[-1]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in ("LICENSE", "README.md", "setup.py", "pyproject.toml", "csrc/ops.cpp", "csrc/cpu/topk.cpp",
              "csrc/common/radix.h", "csrc/cuda/topk.cu", "csrc/cuda/kernels.cuh", "bip_fast/__init__.py"):
        assert f in names, f
