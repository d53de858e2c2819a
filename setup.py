"""Build mod_ext._C: a CUDA extension when nvcc and a CUDA build of PyTorch are
present, a CPU-only extension otherwise.

Environment:
  MOD_EXT_FORCE_CPU=1      build the CPU-only extension even when CUDA is available.
  CUDA_HOME / CUDA_PATH    the CUDA toolkit root (found automatically otherwise, also
                           when the nvcc on PATH is a wrapper outside the toolkit tree).
  TORCH_CUDA_ARCH_LIST     GPU architectures; default without a GPU: "8.0;9.0+PTX".
  MAX_JOBS                 parallel compile jobs (ninja).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[mod_ext setup] {msg}", file=sys.stderr, flush=True)


def _is_toolkit_root(path: str) -> bool:
    if not path:
        return False
    has_nvcc = os.path.isfile(os.path.join(path, "bin", "nvcc"))
    has_cudart = any(
        glob.glob(os.path.join(path, sub, "libcudart.so*"))
        for sub in ("lib64", "lib", "targets/*/lib")
    )
    return has_nvcc and has_cudart


def find_cuda_home():
    """Return the CUDA toolkit root, or None.

    Order: $CUDA_HOME / $CUDA_PATH; the TOP directory that `nvcc -dryrun` reports (right
    even when the nvcc on PATH is a wrapper script outside the toolkit tree); the
    resolved path of nvcc; /usr/local/cuda and /usr/local/cuda-*.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit_root(root):
                return os.path.realpath(root)
            _log(f"ignoring {var}={root}: no bin/nvcc and libcudart there")
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "probe.cu")
                open(src, "w").close()
                out = subprocess.run(
                    [nvcc, "-dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                    capture_output=True, text=True, timeout=60,
                )
            text = out.stdout + out.stderr
            m = re.search(r"^#\$ TOP=(.+)$", text, flags=re.MULTILINE)
            if m and _is_toolkit_root(os.path.realpath(m.group(1).strip())):
                return os.path.realpath(m.group(1).strip())
        except (OSError, subprocess.SubprocessError) as e:
            _log(f"`nvcc -dryrun` failed ({e}); trying other locations")
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit_root(root):
            return root
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_toolkit_root(root):
            return os.path.realpath(root)
    return None


def _pip_cuda_include_dirs():
    """Include folders of the nvidia-* wheels that CUDA builds of PyTorch depend on."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _want_cuda():
    """(use_cuda, reason) for this build."""
    if os.environ.get("MOD_EXT_FORCE_CPU", "0") not in ("", "0"):
        return False, "MOD_EXT_FORCE_CPU is set"
    import torch  # noqa: F401  (imported only after CUDA_HOME is settled)

    if torch.version.cuda is None:
        return False, f"PyTorch {torch.__version__} is a CPU-only build"
    return True, f"PyTorch {torch.__version__} was built with CUDA {torch.version.cuda}"


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
cuda_home = None
if os.environ.get("MOD_EXT_FORCE_CPU", "0") in ("", "0"):
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

use_cuda, reason = _want_cuda()
if use_cuda and cuda_home is None:
    use_cuda, reason = False, "no CUDA toolkit (nvcc + libcudart) was found; set CUDA_HOME"

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
# at::parallel_for only runs in parallel when the extension itself is compiled with
# OpenMP (ATen/Parallel-inl.h checks _OPENMP); torch's build helpers do not add it.
cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
link_flags = ["-fopenmp"]

if use_cuda:
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # PyTorch's CUDA headers include cuSPARSE/cuBLAS headers that a minimal toolkit may
    # lack; the nvidia-* wheels installed beside torch ship them. -idirafter keeps the
    # toolkit's own headers first.
    extra_inc = []
    for d in _pip_cuda_include_dirs():
        extra_inc += ["-Xcompiler", "-idirafter", "-Xcompiler", d]
    ext = CUDAExtension(
        name="mod_ext._C",
        sources=sources,
        extra_compile_args={
            "cxx": cxx_flags + ["-DMOD_EXT_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-DMOD_EXT_WITH_CUDA"] + extra_inc,
        },
        extra_link_args=link_flags,
    )
    _log(f"building the CUDA extension ({reason}; toolkit {cuda_home}; "
         f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
else:
    ext = CppExtension(
        name="mod_ext._C", sources=sources, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    _log(f"building the CPU-only extension ({reason})")

# Record what was built so `mod_ext.build_info()` (and the demo) can say it at run time.
import torch  # noqa: E402

with open(os.path.join(HERE, "mod_ext", "_build_info.py"), "w") as f:
    f.write(
        "# Generated by setup.py at build time; do not edit.\n"
        f"BACKEND = {'cuda' if use_cuda else 'cpu'!r}\n"
        f"REASON = {reason!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_HOME = {cuda_home if use_cuda else None!r}\n"
        f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if use_cuda else None!r}\n"
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
