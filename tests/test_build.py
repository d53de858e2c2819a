"""What mod_ext._C says about its own build (mod_ext.build_info()), checked against what
the dispatcher actually has registered, and the build-system invariants: no build info
written into the source tree, one default CUDA arch list shared by setup.py and CMake."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch

import mod_ext
from mod_ext import ops as mod_ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFO = mod_ext.build_info()
OLD_KEYS = ["backend", "reason", "built_with_torch", "cuda_home", "cuda_arch_list",
            "cuda_kernels_registered", "cuda_available", "torch"]  # .ci/run, benchmarks
NEW_KEYS = ["build_system", "cuda_archs_compiled", "cuda_runtime_built", "openmp", "openmp_version",
            "openmp_max_threads", "aten_num_threads", "families"]


def test_build_info_keys_and_json():
    for key in OLD_KEYS + NEW_KEYS:
        assert key in INFO, f"build_info() lacks {key!r}: {sorted(INFO)}"
    assert json.loads(json.dumps(INFO)) == INFO, "build_info() must be printable as JSON"
    assert INFO["build_system"] in ("setuptools", "cmake")


@pytest.mark.parametrize("backend,key", [("cpu", "CPU"), ("cuda", "CUDA")])
@pytest.mark.parametrize("family", sorted(mod_ops.FAMILIES))
def test_families_match_the_dispatcher(family, backend, key):
    """A family is reported built exactly when every one of its ops has a kernel for the
    backend's dispatch key."""
    built = INFO["families"][family][backend]
    for op in mod_ops.FAMILIES[family]:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"mod_ext::{op}", key)
        assert has == built, f"{family}/{backend} reported {built}, but mod_ext::{op} has a {key} kernel: {has}"


def test_every_registered_op_is_in_a_family():
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mod_ext::")}
    listed = {op for ops in mod_ops.FAMILIES.values() for op in ops}
    assert names == listed, f"ops {sorted(names ^ listed)} are missing from FAMILIES or not registered"


def test_cpu_families_always_built():
    assert all(INFO["families"][f]["cpu"] for f in mod_ops.FAMILIES), INFO["families"]


def test_backend_and_reason_consistent():
    cuda = mod_ext.cuda_built()
    assert INFO["cuda_kernels_registered"] == cuda
    assert (INFO["backend"] == "cuda") == cuda
    assert all(INFO["families"][f]["cuda"] == cuda for f in mod_ops.FAMILIES)
    if cuda:
        assert INFO["reason"] == "built with the CUDA kernels"
        assert INFO["cuda_runtime_built"] and re.fullmatch(r"\d+\.\d+", INFO["cuda_runtime_built"])
        assert INFO["cuda_archs_compiled"], "a CUDA build compiles device code for some architecture"
        requested = {int(float(a.replace("+PTX", "")) * 100 + 0.5) // 10 * 10
                     for a in re.split(r"[ ;]", INFO["cuda_arch_list"]) if a}
        assert set(INFO["cuda_archs_compiled"]) == requested, (INFO["cuda_archs_compiled"], INFO["cuda_arch_list"])
    else:
        assert INFO["reason"] and INFO["reason"] != "built with the CUDA kernels", "a CPU-only build says why"
        assert INFO["cuda_archs_compiled"] is None and INFO["cuda_runtime_built"] is None


def test_built_against_this_torch():
    assert INFO["built_with_torch"] == torch.__version__.split("+")[0]
    assert INFO["torch"] == torch.__version__
    assert INFO["cuda_available"] == torch.cuda.is_available()


def test_openmp_reported():
    # setup.py and CMake both compile with OpenMP, so at::parallel_for runs in parallel.
    assert INFO["openmp"] is True
    assert INFO["openmp_max_threads"] >= 1 and INFO["openmp_version"] >= 201107
    assert INFO["aten_num_threads"] >= 1


def test_no_build_info_in_the_source_tree():
    assert not (ROOT / "mod_ext" / "_build_info.py").exists(), "build info must come from the compiled module"
    assert "_build_info" not in (ROOT / ".gitignore").read_text()
    assert "_build_info.py" not in (ROOT / "setup.py").read_text()


def test_one_default_cuda_arch_list():
    """setup.py and CMakeLists.txt both read csrc/cuda_arch_list.txt and hard-code none."""
    lines = [l.strip() for l in (ROOT / "csrc" / "cuda_arch_list.txt").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert len(lines) == 1 and re.fullmatch(r"(\d+\.\d+[a-z]?(\+PTX)?;)*\d+\.\d+[a-z]?(\+PTX)?", lines[0]), lines
    for name in ("setup.py", "CMakeLists.txt"):
        text = (ROOT / name).read_text()
        assert "cuda_arch_list.txt" in text, f"{name} does not read the default arch list"
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        assert not re.search(r"\d\.\d(\+PTX)?;\d\.\d", code), f"{name} hard-codes an arch list"
        assert not re.search(r"CUDA_ARCHITECTURES\s+\d", code), f"{name} hard-codes CMAKE_CUDA_ARCHITECTURES"


def test_module_is_pybind11_and_exposes_build_info():
    c = mod_ext._C
    assert callable(c.build_info) and "build_info" in (c.build_info.__doc__ or "")
    raw = c.build_info()
    assert raw["torch_version_built"] == INFO["built_with_torch"]
