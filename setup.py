"""Build mod_ext._C: a CUDA extension when nvcc and a CUDA build of PyTorch are
present, a CPU-only extension otherwise.

Environment:
  MOD_EXT_FORCE_CPU=1      build the CPU-only extension even when CUDA is available.
  CUDA_HOME / CUDA_PATH    the CUDA toolkit root (found automatically otherwise, also
                           when the nvcc on PATH is a wrapper outside the toolkit tree).
  TORCH_CUDA_ARCH_LIST     GPU architectures; default: csrc/cuda_arch_list.txt (the one
                           default, shared with CMakeLists.txt).
  MAX_JOBS                 parallel compile jobs (ninja).

What was built (backend, reason, architectures, kernel families, OpenMP, torch version) is
compiled into mod_ext._C itself: build_ext generates mod_ext_build_config.h from
csrc/include/mod_ext/build_config.h.in into its build folder (CMake does the same with
configure_file), and mod_ext.build_info() reads it back from the module. Nothing is
written into the source tree.
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


def default_cuda_arch_list() -> str:
    """The one default arch list (csrc/cuda_arch_list.txt; CMakeLists.txt reads it too)."""
    with open(os.path.join(HERE, "csrc", "cuda_arch_list.txt")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    return lines[0]


def _c_string(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
include_dirs = [os.path.join(HERE, "csrc", "include")]
# at::parallel_for only runs in parallel when the extension itself is compiled with
# OpenMP (ATen/Parallel-inl.h checks _OPENMP); torch's build helpers do not add it.
cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
link_flags = ["-fopenmp"]

if use_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list()
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
        include_dirs=include_dirs,
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
        name="mod_ext._C", sources=sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
    )
    _log(f"building the CPU-only extension ({reason})")

BUILD_CONFIG = {
    "MOD_EXT_BUILD_SYSTEM": "setuptools",
    "MOD_EXT_CPU_ONLY_REASON": "" if use_cuda else reason,
    "MOD_EXT_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else "",
    "MOD_EXT_CUDA_HOME": (cuda_home or "") if use_cuda else "",
}

_Base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


class build_ext(_Base):
    """BuildExtension that first generates mod_ext_build_config.h into the build folder."""

    def build_extensions(self):
        out_dir = os.path.join(os.path.abspath(self.build_temp), "mod_ext_generated")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(HERE, "csrc", "include", "mod_ext", "build_config.h.in")) as f:
            text = f.read()
        for key, value in BUILD_CONFIG.items():
            text = text.replace(f"@{key}@", _c_string(value))
        path = os.path.join(out_dir, "mod_ext_build_config.h")
        old = open(path).read() if os.path.exists(path) else None
        if old != text:  # rewrite only on change, so ninja does not rebuild needlessly
            with open(path, "w") as f:
                f.write(text)
        for e in self.extensions:
            if out_dir not in e.include_dirs:
                e.include_dirs.append(out_dir)
        super().build_extensions()


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
