// The one place that defines every mod_ext op schema.
//
// Backend files (routing_cpu.cpp, cuda/routing_cuda.cu) only add kernels with
// TORCH_LIBRARY_IMPL; fake kernels and autograd are registered from Python in
// mod_ext/ops.py with torch.library. Semantics: docs/MOD_SPEC.md and the
// docstrings in mod_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import mod_ext._C` loads this shared library, which runs the static
// registrations below. The module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mod_ext compiled ops (registered under torch.ops.mod_ext)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mod_ext, m) {
  // Expert-choice top-k over the sequence (MOD_SPEC sections 1-2).
  m.def("topk_route(Tensor router_logits, int capacity, Tensor? valid=None)"
        " -> (Tensor indices, Tensor slot_mask)");
  // Causal first-come-first-served routing by score > 0 (MOD_SPEC section 3).
  m.def("threshold_route(Tensor scores, int capacity, Tensor? valid=None)"
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
}
