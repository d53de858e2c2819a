// CPU kernel of the router_logits family: z[b, s] = <x[b, s, :], weight> (+ bias) in
// float32 (float64 for float64 x). Schema: registration.cpp; oracle:
// mod_ext/reference.py router_logits_ref.
//
// float32 / float64 x: at::matmul (router_logits.h), bit-identical to the expression the
// layer used before. bfloat16 / float16 x: one dot product per (b, s) row read straight
// from x with its strides, converted element by element (no float32 copy of x), with
// kLanes independent partial sums so the loop vectorizes (its order differs from a
// serial sum or BLAS; compared with a tolerance). Parallel over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "mod_ext/build_registry.h"
#include "mod_ext/checks.h"
#include "mod_ext/router_logits.h"

namespace mod_ext {
namespace {

constexpr int64_t kLanes = 16;

template <typename scalar_t>
float dot_row(const scalar_t* x, int64_t stride, const float* w, int64_t D) {
  float part[kLanes] = {};
  int64_t d = 0;
  if (stride == 1) {
    for (; d + kLanes <= D; d += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) part[l] += static_cast<float>(x[d + l]) * w[d + l];
    }
  } else {
    for (; d + kLanes <= D; d += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        part[l] += static_cast<float>(x[(d + l) * stride]) * w[d + l];
      }
    }
  }
  for (; d < D; ++d) part[d % kLanes] += static_cast<float>(x[d * stride]) * w[d];
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// out[b, s] = dot(x[b, s, :], w) (+ bias) for every row; out is a contiguous (B, S) float32.
template <typename scalar_t>
void rows(const at::Tensor& x, const at::Tensor& w, bool has_bias, float bias, at::Tensor& out) {
  const int64_t S = x.size(1), D = x.size(2);
  const int64_t sb = x.stride(0), ss = x.stride(1), sd = x.stride(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const float* wp = w.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  // ~8k multiply-adds per task at least
  at::parallel_for(0, out.numel(), std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float z = dot_row(xp + (r / S) * sb + (r % S) * ss, sd, wp, D);
      op[r] = has_bias ? z + bias : z;
    }
  });
}

at::Tensor router_logits_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  if (auto out = router_logits_checked_or_matmul(x, weight, bias); out.defined()) return out;
  const auto st = x.scalar_type();  // bfloat16 or float16
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const auto w = weight.to(at::kFloat).contiguous();
  const float b = bias.has_value() ? bias->to(at::kFloat).item<float>() : 0.f;  // CPU: no sync
  const bool has_bias = bias.has_value();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "router_logits_cpu",  // bfloat16, float16
                                     [&] { rows<scalar_t>(x, w, has_bias, b, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, CPU, m) { m.impl("router_logits", &router_logits_cpu); }
MOD_EXT_REGISTER_FAMILY(router_logits, cpu);

}  // namespace mod_ext
