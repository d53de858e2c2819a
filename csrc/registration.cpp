// The one place that defines every mod_ext op schema, and the Python module mod_ext._C.
//
// Kernels live by op family and backend (csrc/cpu/{route,rows,router_logits}.cpp,
// csrc/cuda/{route,rows,router_logits}.cu) and only add TORCH_LIBRARY_IMPL blocks;
// autograd (and the in-place op's version counter) are registered in C++ in autograd.cpp;
// fake kernels and vmap rules from Python in mod_ext/ops.py. Semantics: docs/MOD_SPEC.md
// and the docstrings in mod_ext/ops.py.
#include <torch/extension.h>  // torch/library.h + pybind11

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mod_ext/build_registry.h"
#include "mod_ext_build_config.h"  // generated into the build tree by setup.py / CMake

namespace mod_ext {

FamilyList& built_families() {
  static FamilyList families;  // function-local: safe from any static initializer
  return families;
}

}  // namespace mod_ext

TORCH_LIBRARY(mod_ext, m) {
  // Expert-choice top-k over the sequence (MOD_SPEC sections 1-2).
  m.def("topk_route(Tensor router_logits, SymInt capacity, Tensor? valid=None)"
        " -> (Tensor indices, Tensor slot_mask)");
  // Causal first-come-first-served routing by score > 0 (MOD_SPEC section 3).
  m.def("threshold_route(Tensor scores, SymInt capacity, Tensor? valid=None)"
        " -> (Tensor indices, Tensor slot_mask)");
  // out[b, j] = x[b, indices[b, j]]
  m.def("gather_tokens(Tensor x, Tensor indices) -> Tensor");
  // grad_x = zeros(B, seq_len, D); grad_x[b, indices[b, j]] += grad_output[b, j]
  m.def("gather_tokens_backward(Tensor grad_output, Tensor indices, SymInt seq_len) -> Tensor");
  // out = x; out[b, indices[b, j]] += weights[b, j] * y[b, j]   (float32 math, rounded once)
  m.def("scatter_add_weighted(Tensor x, Tensor y, Tensor indices, Tensor weights) -> Tensor");
  // In-place variant for inference: x[b, indices[b, j]] += weights[b, j] * y[b, j].
  // Returns nothing (functionalisation cannot handle a custom op that returns an alias).
  m.def("scatter_add_weighted_(Tensor(a!) x, Tensor y, Tensor indices, Tensor weights) -> ()");
  // grad_y[b, j] = weights[b, j] * grad_output[b, indices[b, j]]
  // grad_weights[b, j] = <grad_output[b, indices[b, j]], y[b, j]>
  m.def("scatter_add_weighted_backward(Tensor grad_output, Tensor y, Tensor indices,"
        " Tensor weights) -> (Tensor grad_y, Tensor grad_weights)");
  // z[b, s] = <x[b, s], weight> (+ bias), accumulated in float32 (float64 for float64 x),
  // returned as float32 (float64): the router logits of MOD_SPEC section 1.1.
  m.def("router_logits(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

namespace {

// Everything only the compiled side knows; mod_ext.build_info() adds the run-time facts.
pybind11::dict build_info() {
  namespace py = pybind11;
  py::dict info;
  info["torch_version_built"] = TORCH_VERSION;
  info["build_system"] = MOD_EXT_BUILD_SYSTEM;
  info["cpu_only_reason"] = MOD_EXT_CPU_ONLY_REASON;
  info["cuda_arch_list_requested"] = MOD_EXT_CUDA_ARCH_LIST;
  info["cuda_home"] = MOD_EXT_CUDA_HOME;
#if defined(MOD_EXT_WITH_CUDA)
  info["cuda_built"] = true;
  info["cuda_archs_compiled"] = mod_ext::cuda_archs_compiled();
  info["cuda_runtime_version_built"] = mod_ext::cuda_runtime_version_built();
#else
  info["cuda_built"] = false;
  info["cuda_archs_compiled"] = py::none();
  info["cuda_runtime_version_built"] = py::none();
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
  info["openmp_max_threads"] = py::none();
#endif
  info["aten_num_threads"] = at::get_num_threads();
  py::dict families;
  for (const char* family : {"route", "rows", "router_logits"}) {
    py::dict backends;
    for (const char* backend : {"cpu", "cuda"}) backends[backend] = false;
    families[family] = backends;
  }
  for (const auto& [family, backend] : mod_ext::built_families()) {
    families[py::str(family)].cast<py::dict>()[py::str(backend)] = true;
  }
  info["families"] = families;
  return info;
}

// Eager fast entry points: the typed operator handle called straight from pybind11,
// instead of torch.ops.mod_ext.<op>.default, which parses its arguments against the
// schema on every call (~1-1.5 us on a tiny input). The call still goes through the
// dispatcher (autograd, ADInplaceOrView, Python dispatch modes, FakeTensor, functorch),
// with the GIL released like PyTorch's own bindings. mod_ext/ops.py calls these only
// when not compiling and no argument or mode overrides __torch_function__; an argument
// that is not a tensor returns NotImplemented, so the wrapper falls back to the
// OpOverload and its usual error.
namespace py = pybind11;

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline bool all_tensors(std::initializer_list<py::handle> args) {
  for (const auto& a : args) {
    if (!THPVariable_Check(a.ptr())) return false;
  }
  return true;
}

py::object fast_gather_tokens(py::handle x, py::handle indices) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&);
  static const auto op = typed_op<Sig>("mod_ext::gather_tokens");
  if (!all_tensors({x, indices})) return py::reinterpret_borrow<py::object>(Py_NotImplemented);
  const at::Tensor& xt = THPVariable_Unpack(x.ptr());
  const at::Tensor& it = THPVariable_Unpack(indices.ptr());
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(xt, it);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

py::object fast_scatter_add_weighted(py::handle x, py::handle y, py::handle indices,
                                     py::handle weights) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&);
  static const auto op = typed_op<Sig>("mod_ext::scatter_add_weighted");
  if (!all_tensors({x, y, indices, weights})) {
    return py::reinterpret_borrow<py::object>(Py_NotImplemented);
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(THPVariable_Unpack(x.ptr()), THPVariable_Unpack(y.ptr()),
                  THPVariable_Unpack(indices.ptr()), THPVariable_Unpack(weights.ptr()));
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

// In place: returns None (the wrapper returns x), or NotImplemented as above.
py::object fast_scatter_add_weighted_(py::handle x, py::handle y, py::handle indices,
                                      py::handle weights) {
  using Sig = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static const auto op = typed_op<Sig>("mod_ext::scatter_add_weighted_");
  if (!all_tensors({x, y, indices, weights})) {
    return py::reinterpret_borrow<py::object>(Py_NotImplemented);
  }
  at::Tensor xt = THPVariable_Unpack(x.ptr());  // shares x's TensorImpl: updated in place
  {
    py::gil_scoped_release no_gil;
    op.call(xt, THPVariable_Unpack(y.ptr()), THPVariable_Unpack(indices.ptr()),
            THPVariable_Unpack(weights.ptr()));
  }
  return py::none();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mod_ext compiled ops (registered under torch.ops.mod_ext when this module loads)";
  m.def("build_info", &build_info,
        "What this library was compiled with: torch version, CUDA architectures and runtime, "
        "OpenMP, the kernel families per backend, and why it is CPU-only when it is.");
  m.def("_gather_tokens", &fast_gather_tokens,
        "mod_ext::gather_tokens through its typed operator handle (eager fast path of "
        "mod_ext.gather_tokens); NotImplemented when an argument is not a tensor.");
  m.def("_scatter_add_weighted", &fast_scatter_add_weighted,
        "mod_ext::scatter_add_weighted through its typed operator handle (eager fast path).");
  m.def("_scatter_add_weighted_", &fast_scatter_add_weighted_,
        "mod_ext::scatter_add_weighted_ through its typed operator handle (eager fast path); "
        "returns None.");
}
