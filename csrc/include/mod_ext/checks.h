// Argument checks shared by the CPU and CUDA kernels of every op family. Every message
// starts with "mod_ext: ", names the argument and states the expected shape or dtype.
//
// Shapes follow one convention everywhere (see docs/MOD_SPEC.md):
//   x             (B, S, D)  hidden states
//   router_logits (B, S)     router logits / predictor scores
//   indices       (B, C)     int64 token positions of the C = capacity slots
//   slot_mask     (B, C)     bool, True for a routed token, False for padding
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <optional>

#include "mod_ext/route_key.h"  // kMaxSeqLen

namespace mod_ext {

// ---------------------------------------------------------------------------
// Argument checks. Every message names the argument and the expected shape.
// ---------------------------------------------------------------------------
#define MOD_CHECK(cond, ...) TORCH_CHECK(cond, "mod_ext: ", __VA_ARGS__)

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* shape) {
  MOD_CHECK(t.dim() == rank, name, " must have shape ", shape, " (", rank,
            " dims), got ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  MOD_CHECK(at::isFloatingType(t.scalar_type()), name,
            " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  MOD_CHECK(a.device() == b.device(), an, " and ", bn,
            " must be on the same device, got ", a.device(), " and ", b.device());
}

// Checks for the two routing ops; returns nothing, throws on bad input.
inline void check_route_args(const char* op, const at::Tensor& logits, const char* logits_name,
                             int64_t capacity, const std::optional<at::Tensor>& valid) {
  check_rank(logits, logits_name, 2, "(B, S)");
  auto st = logits.scalar_type();
  MOD_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", logits_name,
            " must be float32, bfloat16 or float16, got ", st);
  const int64_t S = logits.size(1);
  MOD_CHECK(S < kMaxSeqLen, op, ": sequences longer than 2^30 tokens are not supported, got S = ", S);
  MOD_CHECK(capacity >= 1 && capacity <= S, op, ": capacity must satisfy 1 <= capacity <= S = ",
            S, " (", logits_name, " has shape ", logits.sizes(), "), got ", capacity);
  if (valid.has_value()) {
    const auto& v = *valid;
    MOD_CHECK(v.scalar_type() == at::kBool, op, ": valid must be a bool tensor of shape (B, S), got ",
              v.scalar_type());
    MOD_CHECK(v.sizes() == logits.sizes(), op, ": valid must have shape (B, S) = ", logits.sizes(),
              ", got ", v.sizes());
    check_same_device(logits, logits_name, v, "valid");
  }
}

inline void check_indices(const char* op, const at::Tensor& indices, int64_t B) {
  check_rank(indices, "indices", 2, "(B, C)");
  MOD_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
            indices.scalar_type());
  MOD_CHECK(indices.size(0) == B, op, ": indices must have shape (B, C) with B = ", B, ", got ",
            indices.sizes());
}

inline void check_gather_args(const at::Tensor& x, const at::Tensor& indices) {
  check_rank(x, "x", 3, "(B, S, D)");
  check_float(x, "x");
  check_indices("gather_tokens", indices, x.size(0));
  check_same_device(x, "x", indices, "indices");
}

inline void check_gather_backward_args(const at::Tensor& grad, const at::Tensor& indices,
                                       int64_t seq_len) {
  check_rank(grad, "grad_output", 3, "(B, C, D)");
  check_float(grad, "grad_output");
  check_indices("gather_tokens_backward", indices, grad.size(0));
  MOD_CHECK(indices.size(1) == grad.size(1), "gather_tokens_backward: indices must have shape (B, C) = (",
            grad.size(0), ", ", grad.size(1), "), got ", indices.sizes());
  MOD_CHECK(seq_len >= 0, "gather_tokens_backward: seq_len must be >= 0, got ", seq_len);
  check_same_device(grad, "grad_output", indices, "indices");
}

inline void check_scatter_args(const char* op, const at::Tensor& x, const char* x_name,
                               const at::Tensor& y, const at::Tensor& indices,
                               const at::Tensor& weights) {
  check_rank(x, x_name, 3, "(B, S, D)");
  check_float(x, x_name);
  check_rank(y, "y", 3, "(B, C, D)");
  MOD_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have the same dtype as ", x_name,
            " (", x.scalar_type(), "), got ", y.scalar_type());
  const int64_t B = x.size(0), D = x.size(2);
  MOD_CHECK(y.size(0) == B && y.size(2) == D, op, ": y must have shape (B, C, D) with B = ", B,
            " and D = ", D, ", got ", y.sizes());
  const int64_t C = y.size(1);
  check_indices(op, indices, B);
  MOD_CHECK(indices.size(1) == C, op, ": indices must have shape (B, C) = (", B, ", ", C,
            "), got ", indices.sizes());
  check_rank(weights, "weights", 2, "(B, C)");
  check_float(weights, "weights");
  MOD_CHECK(weights.sizes() == indices.sizes(), op, ": weights must have shape (B, C) = (", B,
            ", ", C, "), got ", weights.sizes());
  check_same_device(x, x_name, y, "y");
  check_same_device(x, x_name, indices, "indices");
  check_same_device(x, x_name, weights, "weights");
}

// The in-place scatter writes into x while reading y and weights: they must not share
// memory with x (a view of x as y would read rows that were already updated).
// Overlap is computed exactly for dense tensors; for other strided views ("too hard")
// any shared storage counts, which is conservative.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  const auto s = at::get_overlap_status(a, b);
  return s == at::MemOverlapStatus::Full || s == at::MemOverlapStatus::Partial ||
         (s == at::MemOverlapStatus::TooHard && a.is_alias_of(b));
}

inline void check_inplace_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weights) {
  MOD_CHECK(!shares_memory(x, y),
            "scatter_add_weighted_: y must not share memory with x (pass y.clone())");
  MOD_CHECK(!shares_memory(x, weights),
            "scatter_add_weighted_: weights must not share memory with x");
  MOD_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes,
            "scatter_add_weighted_: x has overlapping memory (e.g. an expanded view); "
            "in-place writes would be ambiguous");
}

// router_logits(x, weight, bias): x (B, S, D) floating, weight (D,) floating, bias None
// or one element, all on x's device.
inline void check_router_logits_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  check_rank(x, "x", 3, "(B, S, D)");
  check_float(x, "x");
  MOD_CHECK(weight.dim() == 1 && weight.size(0) == x.size(2),
            "router_logits: weight must have shape (D,) = (", x.size(2), ",), got ",
            weight.sizes());
  check_float(weight, "weight");
  check_same_device(x, "x", weight, "weight");
  if (bias.has_value()) {
    MOD_CHECK(bias->numel() == 1, "router_logits: bias must be None or a tensor with one element, got shape ",
              bias->sizes());
    check_float(*bias, "bias");
    check_same_device(x, "x", *bias, "bias");
  }
}

// The float dtypes the routing ops accept (check_route_args enforces the same set).
#define MOD_EXT_DISPATCH_ROUTE_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// The dtypes of hidden states (x, y, gradients): every floating type.
#define MOD_EXT_DISPATCH_DATA_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, \
                                  NAME, __VA_ARGS__)

}  // namespace mod_ext
