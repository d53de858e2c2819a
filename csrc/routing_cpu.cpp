// CPU kernels for the mod_ext routing ops. Schemas: registration.cpp.
// Semantics: mod_ext/reference.py (the oracles the tests compare against).
//
// Every kernel is parallel over rows (at::parallel_for), works on contiguous
// copies of its inputs, accumulates in float32 (float64 for double) and rounds once.
#include "mod_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace mod_ext {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t grain_for(int64_t work_per_row) {
  // Aim for ~32k elements of work per task so small rows are batched together.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

// Reads a row of router logits (any of fp32/bf16/fp16) as float32 into `dst`.
template <typename scalar_t>
void load_row(const scalar_t* src, int64_t S, float* dst) {
  for (int64_t s = 0; s < S; ++s) dst[s] = static_cast<float>(src[s]);
}

}  // namespace

// ---------------------------------------------------------------------------
// topk_route: expert-choice top-k per row. Builds the unique 64-bit route_key
// of every token, selects the `capacity` largest with nth_element (O(S)), then
// emits their positions in ascending order with one pass over a flag array.
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> topk_route_cpu(const at::Tensor& router_logits,
                                                  int64_t capacity,
                                                  const c10::optional<at::Tensor>& valid) {
  check_route_args("topk_route", router_logits, "router_logits", capacity, valid);
  const int64_t B = router_logits.size(0), S = router_logits.size(1);
  auto indices = at::empty({B, capacity}, router_logits.options().dtype(at::kLong));
  auto slot_mask = at::empty({B, capacity}, router_logits.options().dtype(at::kBool));
  if (B == 0) return {indices, slot_mask};

  const auto logits = router_logits.contiguous();
  const auto valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* valid_ptr = valid_c.defined() ? valid_c.data_ptr<bool>() : nullptr;
  int64_t* idx_ptr = indices.data_ptr<int64_t>();
  bool* mask_ptr = slot_mask.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_cpu", [&] {
    const scalar_t* src = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(S), [&](int64_t begin, int64_t end) {
      std::vector<float> values(S);
      std::vector<uint64_t> keys(S), scratch(S);
      for (int64_t b = begin; b < end; ++b) {
        load_row(src + b * S, S, values.data());
        const bool* v = valid_ptr ? valid_ptr + b * S : nullptr;
        for (int64_t s = 0; s < S; ++s) keys[s] = route_key(values[s], v ? v[s] : true, s);
        // The capacity-th largest key: everything >= it is chosen (keys are unique).
        scratch.assign(keys.begin(), keys.end());
        std::nth_element(scratch.begin(), scratch.begin() + (capacity - 1), scratch.end(),
                         std::greater<uint64_t>());
        const uint64_t threshold = scratch[capacity - 1];
        int64_t j = 0;
        for (int64_t s = 0; s < S; ++s) {
          if (keys[s] >= threshold) {
            idx_ptr[b * capacity + j] = s;
            mask_ptr[b * capacity + j] = v ? v[s] : true;
            ++j;
          }
        }
        TORCH_INTERNAL_ASSERT(j == capacity, "topk_route_cpu: selected ", j, " != ", capacity);
      }
    });
  });
  return {indices, slot_mask};
}

// ---------------------------------------------------------------------------
// threshold_route: causal first-come-first-served routing (MOD_SPEC section 3).
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> threshold_route_cpu(const at::Tensor& scores, int64_t capacity,
                                                       const c10::optional<at::Tensor>& valid) {
  check_route_args("threshold_route", scores, "scores", capacity, valid);
  const int64_t B = scores.size(0), S = scores.size(1);
  auto indices = at::empty({B, capacity}, scores.options().dtype(at::kLong));
  auto slot_mask = at::empty({B, capacity}, scores.options().dtype(at::kBool));
  if (B == 0) return {indices, slot_mask};

  const auto sc = scores.contiguous();
  const auto valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* valid_ptr = valid_c.defined() ? valid_c.data_ptr<bool>() : nullptr;
  int64_t* idx_ptr = indices.data_ptr<int64_t>();
  bool* mask_ptr = slot_mask.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "threshold_route_cpu", [&] {
    const scalar_t* src = sc.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = src + b * S;
        const bool* v = valid_ptr ? valid_ptr + b * S : nullptr;
        // Pass 1: how many tokens are routed (first come, first served, capped).
        int64_t n_routed = 0;
        for (int64_t s = 0; s < S && n_routed < capacity; ++s) {
          if ((!v || v[s]) && static_cast<float>(row[s]) > 0.f) ++n_routed;
        }
        const int64_t n_padding = capacity - n_routed;
        // Pass 2: emit routed tokens and the lowest-position unrouted ones, in order.
        int64_t routed_so_far = 0, padding_so_far = 0, j = 0;
        for (int64_t s = 0; s < S && j < capacity; ++s) {
          const bool routed = (!v || v[s]) && static_cast<float>(row[s]) > 0.f &&
                              routed_so_far < capacity;
          if (routed) {
            ++routed_so_far;
          } else if (padding_so_far < n_padding) {
            ++padding_so_far;
          } else {
            continue;
          }
          idx_ptr[b * capacity + j] = s;
          mask_ptr[b * capacity + j] = routed;
          ++j;
        }
        TORCH_INTERNAL_ASSERT(j == capacity, "threshold_route_cpu: selected ", j, " != ", capacity);
      }
    });
  });
  return {indices, slot_mask};
}

namespace {

// Bounds check shared by gather and scatter (CPU only; CUDA cannot raise without a sync).
inline void check_index_range(const char* op, const at::Tensor& indices, int64_t S) {
  if (indices.numel() == 0) return;
  const int64_t* p = indices.data_ptr<int64_t>();
  const int64_t n = indices.numel();
  for (int64_t i = 0; i < n; ++i) {
    MOD_CHECK(p[i] >= 0 && p[i] < S, op, ": indices must lie in [0, S) = [0, ", S,
              "), got ", p[i], " at flat position ", i);
  }
}

// Rejects duplicate indices within a row (scatter_add_weighted's contract).
inline void check_unique_per_row(const char* op, const at::Tensor& indices, int64_t S) {
  const int64_t B = indices.size(0), C = indices.size(1);
  if (B == 0 || C == 0) return;
  const int64_t* p = indices.data_ptr<int64_t>();
  std::vector<uint8_t> seen(S, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = p + b * C;
    for (int64_t j = 0; j < C; ++j) {
      MOD_CHECK(!seen[row[j]], op, ": indices must be unique within each row; row ", b,
                " repeats position ", row[j]);
      seen[row[j]] = 1;
    }
    for (int64_t j = 0; j < C; ++j) seen[row[j]] = 0;
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// gather_tokens: out[b, j] = x[b, indices[b, j]], one contiguous row copy per slot.
// ---------------------------------------------------------------------------
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& indices) {
  check_gather_args(x, indices);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), C = indices.size(1);
  auto out = at::empty({B, C, D}, x.options());
  if (out.numel() == 0) {
    check_index_range("gather_tokens", indices.contiguous(), S);
    return out;
  }
  const auto xc = x.contiguous();
  const auto idx = indices.contiguous();
  check_index_range("gather_tokens", idx, S);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(D) * x.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * C, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / C;
      std::memcpy(dst + i * row_bytes, src + (b * S + ip[i]) * row_bytes, row_bytes);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// gather_tokens_backward: grad_x = 0; grad_x[b, indices[b, j]] += grad_output[b, j].
// Rows are processed in slot order, so repeated indices accumulate correctly.
// ---------------------------------------------------------------------------
at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                      int64_t seq_len) {
  check_gather_backward_args(grad_output, indices, seq_len);
  const int64_t B = grad_output.size(0), C = grad_output.size(1), D = grad_output.size(2);
  const int64_t S = seq_len;
  auto grad_x = at::zeros({B, S, D}, grad_output.options());
  const auto idx = indices.contiguous();
  check_index_range("gather_tokens_backward", idx, S);
  if (grad_output.numel() == 0) return grad_x;
  const auto g = grad_output.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gather_tokens_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < C; ++j) {
          const scalar_t* src = gp + (b * C + j) * D;
          scalar_t* dst = op + (b * S + ip[b * C + j]) * D;
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = static_cast<scalar_t>(static_cast<acc>(dst[d]) + static_cast<acc>(src[d]));
          }
        }
      }
    });
  });
  return grad_x;
}

// ---------------------------------------------------------------------------
// scatter_add_weighted: out = x; out[b, idx] = round(x[b, idx] + w[b, j] * y[b, j]).
// ---------------------------------------------------------------------------
namespace {

// out[b, idx] = round(out[b, idx] + w[b, j] * y[b, j]) for every slot; `out` is
// contiguous (B, S, D) and is updated in place. Indices are already range- and
// uniqueness-checked, so slots of a row write disjoint rows.
void scatter_rows_cpu_(at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                       const at::Tensor& weights) {
  const int64_t B = out.size(0), S = out.size(1), D = out.size(2), C = idx.size(1);
  if (B == 0 || C == 0 || D == 0) return;
  const auto yc = y.contiguous();
  const bool is_double = out.scalar_type() == at::kDouble;
  const auto w = weights.to(is_double ? at::kDouble : at::kFloat).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_add_weighted_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    const acc* wp = w.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain_for(D), [&](int64_t begin, int64_t end) {
      // The product w * y is rounded to acc and stored before the add, in a separate
      // loop: written as one expression `x + w * y`, GCC (whose default in C++ is
      // -ffp-contract=fast) fuses it into an FMA wherever the target has one (aarch64,
      // x86 with -march=native), which rounds differently from the reference (product
      // tensor, then scatter_add) and from the CUDA kernel (__fmul_rn / __fadd_rn).
      std::vector<acc> prod(static_cast<size_t>(D));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / C;
        const acc wi = wp[i];
        const scalar_t* src = yp + i * D;
        scalar_t* dst = op + (b * S + ip[i]) * D;
        for (int64_t d = 0; d < D; ++d) prod[d] = wi * static_cast<acc>(src[d]);
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(static_cast<acc>(dst[d]) + prod[d]);
        }
      }
    });
  });
}

}  // namespace

at::Tensor scatter_add_weighted_cpu(const at::Tensor& x, const at::Tensor& y,
                                    const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted", x, "x", y, indices, weights);
  const auto idx = indices.contiguous();
  check_index_range("scatter_add_weighted", idx, x.size(1));
  check_unique_per_row("scatter_add_weighted", idx, x.size(1));
  auto out = x.contiguous().clone();  // unrouted rows: bit-identical copies of x
  scatter_rows_cpu_(out, y, idx, weights);
  return out;
}

// ---------------------------------------------------------------------------
// scatter_add_weighted_: the in-place variant for inference (no copy of x).
// ---------------------------------------------------------------------------
void scatter_add_weighted__cpu(at::Tensor& x, const at::Tensor& y,
                                 const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted_", x, "x", y, indices, weights);
  check_inplace_args(x, y, weights);
  const auto idx = indices.contiguous();
  check_index_range("scatter_add_weighted_", idx, x.size(1));
  check_unique_per_row("scatter_add_weighted_", idx, x.size(1));
  if (x.is_contiguous()) {
    scatter_rows_cpu_(x, y, idx, weights);
  } else {
    auto tmp = x.contiguous();
    scatter_rows_cpu_(tmp, y, idx, weights);
    x.copy_(tmp);
  }
}

// ---------------------------------------------------------------------------
// scatter_add_weighted_backward: one fused pass per slot reads the output
// gradient's routed row once and produces both grad_y and the weight gradient.
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> scatter_add_weighted_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& y, const at::Tensor& indices,
    const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted_backward", grad_output, "grad_output", y, indices,
                     weights);
  const int64_t B = grad_output.size(0), S = grad_output.size(1), D = grad_output.size(2);
  const int64_t C = indices.size(1);
  const auto idx = indices.contiguous();
  check_index_range("scatter_add_weighted_backward", idx, S);
  auto grad_y = at::empty({B, C, D}, y.options());
  const bool is_double = y.scalar_type() == at::kDouble;
  const auto acc_type = is_double ? at::kDouble : at::kFloat;
  auto grad_w_acc = at::zeros({B, C}, weights.options().dtype(acc_type));
  if (B > 0 && C > 0 && D > 0) {
    const auto g = grad_output.contiguous();
    const auto yc = y.contiguous();
    const auto w = weights.to(acc_type).contiguous();
    const int64_t* ip = idx.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "scatter_add_weighted_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* yp = yc.data_ptr<scalar_t>();
      const acc* wp = w.data_ptr<acc>();
      scalar_t* gyp = grad_y.data_ptr<scalar_t>();
      acc* gwp = grad_w_acc.data_ptr<acc>();
      at::parallel_for(0, B * C, grain_for(D), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / C;
          const scalar_t* grow = gp + (b * S + ip[i]) * D;
          const scalar_t* yrow = yp + i * D;
          scalar_t* gyrow = gyp + i * D;
          const acc wi = wp[i];
          acc dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            const acc gd = static_cast<acc>(grow[d]);
            gyrow[d] = static_cast<scalar_t>(wi * gd);
            dot += gd * static_cast<acc>(yrow[d]);
          }
          gwp[i] = dot;
        }
      });
    });
  } else if (B > 0 && C > 0) {
    grad_y.zero_();
  }
  return {grad_y, grad_w_acc.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(mod_ext, CPU, m) {
  m.impl("topk_route", &topk_route_cpu);
  m.impl("threshold_route", &threshold_route_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cpu);
  m.impl("scatter_add_weighted", &scatter_add_weighted_cpu);
  m.impl("scatter_add_weighted_", &scatter_add_weighted__cpu);
  m.impl("scatter_add_weighted_backward", &scatter_add_weighted_backward_cpu);
}

}  // namespace mod_ext
