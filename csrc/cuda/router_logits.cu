// CUDA kernel of the router_logits family: z[b, s] = <x[b, s, :], weight> (+ bias) in
// float32 (float64 for float64 x). Schema: registration.cpp; oracle:
// mod_ext/reference.py router_logits_ref; common rules: mod_ext/cuda_launch.cuh.
//
// float32 / float64 x: at::matmul (router_logits.h), bit-identical to the expression the
// layer used before. bfloat16 / float16 x: one warp per (b, s) row reads the row straight
// from x with its strides (coalesced when the last dim is contiguous), converts each
// element to float32 and sums with a fixed-order warp reduction (deterministic); no
// float32 copy of x. The bias is read on the device (no host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "mod_ext/build_registry.h"
#include "mod_ext/checks.h"
#include "mod_ext/cuda_launch.cuh"
#include "mod_ext/router_logits.h"

namespace mod_ext {
namespace {

using cuda::blocks_for;
using cuda::kFullMask;

constexpr int kThreads = 256;            // 8 warps, one row each
constexpr int kRowsPerBlock = kThreads / 32;

// Launch: grid-stride over groups of kRowsPerBlock rows; blockDim = (32, kRowsPerBlock).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
router_logits_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w,
                     const float* __restrict__ bias, float* __restrict__ out, int64_t n_rows,
                     int64_t S, int64_t D, int64_t sb, int64_t ss, int64_t sd) {
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < n_rows;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const scalar_t* row = x + (r / S) * sb + (r % S) * ss;
    float acc = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += 32) acc += static_cast<float>(row[d * sd]) * w[d];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(kFullMask, acc, o);
    if (threadIdx.x == 0) out[r] = bias != nullptr ? acc + *bias : acc;
  }
}

at::Tensor router_logits_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  if (auto out = router_logits_checked_or_matmul(x, weight, bias); out.defined()) return out;
  const auto st = x.scalar_type();  // bfloat16 or float16
  const at::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  const int64_t n_rows = out.numel();
  if (n_rows == 0) return out;
  const auto w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).reshape({1}).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "router_logits_cuda", [&] {  // bfloat16, float16
    router_logits_kernel<scalar_t><<<blocks_for((n_rows + kRowsPerBlock - 1) / kRowsPerBlock),
                                     dim3(32, kRowsPerBlock), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
        b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), n_rows,
        x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, CUDA, m) { m.impl("router_logits", &router_logits_cuda); }
MOD_EXT_REGISTER_FAMILY(router_logits, cuda);

}  // namespace mod_ext
