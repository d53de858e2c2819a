// router_logits for float32 / float64 x, shared by the CPU and CUDA kernels: exactly
// torch.matmul(x, weight.to(acc)) + bias.to(acc).reshape(()) (acc = x.dtype), so the
// result is bit-identical to that expression. Low-precision x goes to each backend's
// own kernel, which reads x in its dtype (no float32 copy of x).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "mod_ext/checks.h"

namespace mod_ext {

inline at::ScalarType router_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor router_logits_matmul(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias) {
  const auto acc = router_acc_type(x);
  auto out = at::matmul(x, weight.to(acc));
  if (bias.has_value()) out.add_(bias->to(acc).reshape({}));
  return out;
}

// The backend-independent part of router_logits: the argument checks, and the result
// itself for float32 / float64 x. Returns an undefined tensor for bfloat16 / float16 x,
// which the calling backend's kernel computes.
inline at::Tensor router_logits_checked_or_matmul(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias) {
  check_router_logits_args(x, weight, bias);
  const auto st = x.scalar_type();
  if (st == at::kFloat || st == at::kDouble) return router_logits_matmul(x, weight, bias);
  MOD_CHECK(st == at::kBFloat16 || st == at::kHalf,
            "router_logits: x must be float32, float64, bfloat16 or float16, got ", st);
  return at::Tensor();
}

}  // namespace mod_ext
