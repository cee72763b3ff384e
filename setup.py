"""Build script for bip_fast's compiled parts (metadata lives in pyproject.toml).

Extensions:
  bip_fast._C       csrc/ops.cpp (op schemas) + csrc/cpu/*.cpp (CPU kernels). Always built.
  bip_fast._C_cuda  csrc/cuda/*.cu (CUDA kernels only; needs _C loaded first for the schemas).
                    Built when nvcc is found and torch has CUDA; a failed CUDA compile is
                    reported and skipped, it never fails the install.
Environment:
  BIP_FAST_SKIP_EXT=1    pure-Python install (no compiled parts)
  BIP_FAST_SKIP_CUDA=1   skip only the CUDA extension
  BIP_FAST_CUDA_ARCHS    e.g. "9.0;8.0" (default "8.0;8.6;9.0"); "+PTX" suffix adds PTX
  MAX_JOBS / BIP_FAST_NVCC_THREADS   parallel compile jobs / nvcc --threads (default 4)
Use: pip install . --no-build-isolation [-v]     (a development checkout: pip install -e ...)
     pip wheel . --no-build-isolation --no-deps   (a wheel for this torch; tests/test_install.py)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0"


def log(msg):
    print(f"bip_fast build: {msg}", file=sys.stderr, flush=True)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def rel_glob(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extra_include_dirs():
    """CUDA headers shipped as pip wheels (nvidia/cu13/include, nvidia/cu12/include, ...)."""
    dirs = []
    import site
    import sysconfig

    roots = {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    for root in sorted(r for r in roots if r):
        for sub in ("cu13", "cu12"):
            d = os.path.join(root, "nvidia", sub, "include")
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def cudart_library_dirs(cuda_home):
    """Directories holding libcudart.so for the linker (the toolkit may live apart from nvcc)."""
    cands = []
    if cuda_home:
        cands += [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
        cands += [os.path.join(cuda_home, "cuda", d) for d in ("lib64", "lib")]
    cands += ["/usr/local/cuda/lib64", "/usr/local/cuda/lib"]
    for inc in extra_include_dirs():
        cands.append(os.path.join(os.path.dirname(inc), "lib"))
    out = []
    for d in cands:
        d = os.path.realpath(d)
        if os.path.exists(os.path.join(d, "libcudart.so")) and d not in out:
            out.append(d)
    return out


def parse_cuda_archs(spec):
    """'9.0;8.0+PTX' -> nvcc -gencode flags. Raises ValueError naming BIP_FAST_CUDA_ARCHS."""
    flags = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        if ptx:
            item = item[:-4]
        item = item.lower().replace("sm_", "").replace("compute_", "")
        num = item.replace(".", "")
        if not num.isdigit() or len(num) < 2:
            raise ValueError(f"BIP_FAST_CUDA_ARCHS: cannot parse architecture {item!r} in {spec!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"BIP_FAST_CUDA_ARCHS: no architectures in {spec!r}")
    return flags


def get_extensions():
    """Returns (ext_modules, cmdclass); logs one line per extension."""
    if env_flag("BIP_FAST_SKIP_EXT"):
        log("_C: skipped (BIP_FAST_SKIP_EXT=1)")
        log("_C_cuda: skipped (BIP_FAST_SKIP_EXT=1)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - depends on the environment
        log(f"_C: skipped (cannot import torch: {e!r}; install torch first and use --no-build-isolation)")
        log("_C_cuda: skipped (cannot import torch)")
        return [], {}

    csrc = os.path.join(ROOT, "csrc")
    include_dirs = [csrc]
    # -ffp-contract=off: no fused multiply-adds, so kernels round like PyTorch's op-by-op math.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    exts = [
        cpp_extension.CppExtension(
            "bip_fast._C",
            sources=["csrc/ops.cpp"] + rel_glob("csrc/cpu/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    cuda_sources = rel_glob("csrc/cuda/*.cu")
    nvcc = None
    if cpp_extension.CUDA_HOME:
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    if env_flag("BIP_FAST_SKIP_CUDA"):
        cuda_reason = "BIP_FAST_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} has no CUDA (torch.version.cuda is None)"
    elif nvcc is None:
        cuda_reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    elif not cuda_sources:
        cuda_reason = "csrc/cuda has no .cu files"
    else:
        cuda_reason = None

    if cuda_reason is None:
        archs = os.environ.get("BIP_FAST_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
        threads = os.environ.get("BIP_FAST_NVCC_THREADS", "4").strip() or "4"
        nvcc_flags = [
            "-O3",
            "-lineinfo",
            f"--threads={threads}",
            "--expt-relaxed-constexpr",
        ] + parse_cuda_archs(archs)
        exts.append(
            cpp_extension.CUDAExtension(
                "bip_fast._C_cuda",
                # py_module.cpp only provides the Python module init (PyInit__C_cuda).
                sources=cuda_sources + ["csrc/cpu/py_module.cpp"],
                include_dirs=include_dirs + extra_include_dirs(),
                library_dirs=cudart_library_dirs(cpp_extension.CUDA_HOME),
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
            )
        )
        log(f"_C_cuda: will build {len(cuda_sources)} .cu file(s) with nvcc {nvcc}, archs {archs} "
            f"(torch CUDA {torch.version.cuda})")
    else:
        log(f"_C_cuda: skipped ({cuda_reason})")

    base = cpp_extension.BuildExtension

    class BuildExt(base):
        """Builds _C strictly; a failure in _C_cuda is logged and the extension dropped."""

        def build_extensions(self):
            self._bip_failed = []
            self._bip_started = False
            try:
                super().build_extensions()
            except Exception as e:
                # Raised before any extension was built: torch's toolchain checks (e.g. nvcc
                # major version != torch.version.cuda). Retry without the CUDA extension.
                has_cuda = any(x.name == "bip_fast._C_cuda" for x in self.extensions)
                if self._bip_started or not has_cuda:
                    raise
                msg = str(e).strip().splitlines()
                log(f"_C_cuda: skipped (CUDA toolchain check failed: {type(e).__name__}: "
                    f"{msg[0] if msg else ''})")
                self._bip_failed.append("bip_fast._C_cuda")
                self.extensions = [x for x in self.extensions if x.name != "bip_fast._C_cuda"]
                super().build_extensions()
            if self._bip_failed:
                self.extensions = [e for e in self.extensions if e.name not in self._bip_failed]

        def build_extension(self, ext):
            self._bip_started = True
            short = ext.name.rsplit(".", 1)[-1]
            try:
                super().build_extension(ext)
            except Exception as e:
                if ext.name != "bip_fast._C_cuda":
                    log(f"{short}: FAILED ({type(e).__name__}: {e})")
                    raise
                msg = str(e).strip().splitlines()
                log(f"{short}: skipped (CUDA compile failed: {type(e).__name__}: "
                    f"{msg[-1] if msg else ''}; CPU extension unaffected, see output above)")
                self._bip_failed.append(ext.name)
                return
            log(f"{short}: built")

        def get_outputs(self):
            failed = set(getattr(self, "_bip_failed", []))
            outs = super().get_outputs()
            if not failed:
                return outs
            names = {f.rsplit(".", 1)[-1] for f in failed}
            return [o for o in outs if os.path.basename(o).split(".")[0] not in names]

    return exts, {"build_ext": BuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
