// CUDA kernels for the mod_ext routing ops (semantics: ../../mod_ext/reference.py and
// ../../../shared/MOD_SPEC.md). Registered for the CUDA dispatch key at the bottom.
//
// Common rules:
//   * Inputs are made contiguous on the host; outputs are contiguous.
//   * No host synchronisation anywhere (the ops run under CUDA-graph capture).
//   * Math is done in float32 (float64 for float64 data) and rounded once to the output dtype.
//   * An index outside [0, S) cannot be checked without a host sync. On CUDA such a slot
//     reads zeros (gather), writes nothing (scatter, gather backward) and gets zero gradients.
//   * All kernels use grid-stride loops over their work items, so any B, C fits the grid.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/cub.cuh>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../mod_ext.h"

namespace mod_ext {
namespace {

constexpr int kRouteThreads = 512;                  // one block per row for the routing ops
constexpr int64_t kMaxBlocks = int64_t(1) << 30;    // grid-stride loops cover the rest
constexpr unsigned kFullMask = 0xffffffffu;

// Threads per block for a per-slot kernel over D features: a multiple of 32 in
// [32, max_threads] (block_sum below needs whole warps).
inline int threads_for(int64_t D, int max_threads) {
  const int64_t t = (D + 31) / 32 * 32;
  return static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(t, max_threads)));
}

inline unsigned blocks_for(int64_t n_items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(n_items, kMaxBlocks)));
}

__device__ __forceinline__ bool index_ok(int64_t p, int64_t S) { return p >= 0 && p < S; }

// Correctly rounded multiply / add that nvcc may not contract into an FMA, so that
// x + w * y rounds exactly like the reference (a product tensor, then scatter_add).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Sum of v over the block; the result is valid in thread 0. blockDim.x must be a multiple
// of 32 (at most 1024). `scratch` holds 32 values; the trailing __syncthreads lets the
// caller reuse it right away. Fixed reduction order, so deterministic for a given blockDim.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    v = lane < n_warps ? scratch[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  }
  __syncthreads();
  return v;
}

// ---------------------------------------------------------------------------
// topk_route: radix select of the k-th largest route_key, then an ordered compaction.
// Launch: grid = min(B, 2^30) blocks (grid-stride over rows), kThreads threads per block.
//
// Pass p (p = 0..7) histograms digit p (bits [56 - 8p, 64 - 8p)) of the keys whose higher
// bits equal the prefix found so far; warp 0 then finds the digit holding the key of rank
// `remaining` (1-based, descending) and updates prefix/remaining. When the chosen bin holds
// exactly `remaining` keys, all of them win, so the threshold is the prefix with zero low
// bits and we stop early. Keys are unique, so after the passes exactly k keys are >= T.
// The compaction then writes the winners' positions in ascending order with a block scan.
// ---------------------------------------------------------------------------
template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(kThreads)
topk_route_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ valid,
                  int64_t B, int S, int k, int64_t* __restrict__ indices,
                  bool* __restrict__ slot_mask) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int s_remaining;
  __shared__ int s_done;

  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const scalar_t* lrow = logits + row * S;
    const bool* vrow = valid != nullptr ? valid + row * S : nullptr;

    uint64_t prefix = 0;  // digits of T found so far, in place; lower bits zero
    int remaining = k;    // rank of T among the keys that match `prefix`
    for (int pass = 0; pass < 8; ++pass) {
      const int shift = 56 - 8 * pass;
      const uint64_t hi_mask = pass == 0 ? 0ull : (~0ull << (shift + 8));
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      for (int t = tid; t < S; t += kThreads) {
        const bool v = vrow != nullptr ? vrow[t] : true;
        const uint64_t key = route_key(static_cast<float>(lrow[t]), v, t);
        if (((key ^ prefix) & hi_mask) == 0) atomicAdd(&hist[(key >> shift) & 0xff], 1);
      }
      __syncthreads();
      if (tid < 32) {
        // Lane l owns bins 255-8l down to 248-8l; an inclusive scan over lanes counts the
        // keys in bins >= the lane's lowest bin.
        const int lane = tid;
        const int hi = 255 - 8 * lane;
        int cnt = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) cnt += hist[hi - i];
        int incl = cnt;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int n = __shfl_up_sync(kFullMask, incl, o);
          if (lane >= o) incl += n;
        }
        // Non-empty: at least `remaining` keys match the prefix (invariant).
        const unsigned ballot = __ballot_sync(kFullMask, incl >= remaining);
        if (ballot != 0u && lane == __ffs(ballot) - 1) {
          int before = incl - cnt;  // matching keys in higher bins
          int digit = hi - 7;
          int in_bin = 0;
          for (int i = 0; i < 8; ++i) {
            in_bin = hist[hi - i];
            if (before + in_bin >= remaining) {
              digit = hi - i;
              break;
            }
            before += in_bin;
          }
          const int rem = remaining - before;
          s_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
          s_remaining = rem;
          s_done = (in_bin == rem) ? 1 : 0;  // always true at pass 7 (unique keys)
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      if (s_done) break;  // uniform across the block
    }
    const uint64_t T = prefix;  // winners: exactly the k keys >= T

    int64_t* out_idx = indices + row * k;
    bool* out_mask = slot_mask + row * k;
    int written = 0;  // uniform: sum of block aggregates
    for (int base = 0; base < S && written < k; base += kThreads) {
      const int t = base + tid;
      bool win = false;
      bool v = false;
      if (t < S) {
        v = vrow != nullptr ? vrow[t] : true;
        win = route_key(static_cast<float>(lrow[t]), v, t) >= T;
      }
      int pos = 0, total = 0;
      BlockScan(scan_storage).ExclusiveSum(win ? 1 : 0, pos, total);
      if (win && written + pos < k) {
        out_idx[written + pos] = t;
        out_mask[written + pos] = v;
      }
      written += total;
      __syncthreads();  // scan_storage is reused by the next chunk
    }
    __syncthreads();  // hist / s_* / scan_storage are reused by the next row
  }
}

// ---------------------------------------------------------------------------
// threshold_route: causal routing by score > 0 with first-come-first-served capacity.
// Launch: grid = min(B, 2^30) blocks (grid-stride over rows), kThreads threads per block.
//
// With want_before(t) = number of want tokens before t (one block scan per chunk):
//   routed(t)        = want(t) && want_before(t) < capacity
//   routed_before(t) = min(want_before(t), capacity)
//   unrouted_before  = t - routed_before(t)
//   padding(t)       = !routed(t) && unrouted_before < n_pad,   n_pad = capacity - R
//   slot(t)          = routed_before(t) + min(unrouted_before, n_pad)   (chosen tokens)
// where R = min(total want, capacity) comes from a first block reduction.
// ---------------------------------------------------------------------------
template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(kThreads)
threshold_route_kernel(const scalar_t* __restrict__ scores, const bool* __restrict__ valid,
                       int64_t B, int S, int capacity, int64_t* __restrict__ indices,
                       bool* __restrict__ slot_mask) {
  using BlockReduce = cub::BlockReduce<int, kThreads>;
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } storage;
  __shared__ int s_total;

  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const scalar_t* srow = scores + row * S;
    const bool* vrow = valid != nullptr ? valid + row * S : nullptr;
    auto wants = [&](int t) -> bool {
      return (vrow != nullptr ? vrow[t] : true) && static_cast<float>(srow[t]) > 0.0f;
    };

    int count = 0;
    for (int t = tid; t < S; t += kThreads) count += wants(t) ? 1 : 0;
    const int total_want = BlockReduce(storage.reduce).Sum(count);  // valid in thread 0
    if (tid == 0) s_total = total_want;
    __syncthreads();  // also separates storage.reduce from storage.scan
    const int n_routed = min(s_total, capacity);
    const int n_pad = capacity - n_routed;

    int64_t* out_idx = indices + row * capacity;
    bool* out_mask = slot_mask + row * capacity;
    int want_before = 0;  // want tokens before this chunk (uniform)
    for (int base = 0; base < S; base += kThreads) {
      const int rb0 = min(want_before, capacity);
      if (rb0 + min(base - rb0, n_pad) >= capacity) break;  // every slot is written
      const int t = base + tid;
      const bool w = t < S && wants(t);
      int wpos = 0, wtotal = 0;
      BlockScan(storage.scan).ExclusiveSum(w ? 1 : 0, wpos, wtotal);
      if (t < S) {
        const int wb = want_before + wpos;
        const int rb = min(wb, capacity);
        const bool routed = w && wb < capacity;
        const int ub = t - rb;
        if (routed || ub < n_pad) {
          const int slot = rb + min(ub, n_pad);
          out_idx[slot] = t;
          out_mask[slot] = routed;
        }
      }
      want_before += wtotal;
      __syncthreads();  // storage.scan is reused by the next chunk
    }
    __syncthreads();  // s_total / storage are reused by the next row
  }
}

// ---------------------------------------------------------------------------
// gather_tokens: out[b, j, :] = x[b, indices[b, j], :] (zeros for an out-of-range index).
// Launch: grid = min(B*C, 2^30) blocks (grid-stride over slots), threads stride over D.
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void gather_tokens_kernel(const scalar_t* __restrict__ x,
                                     const int64_t* __restrict__ indices,
                                     scalar_t* __restrict__ out, int64_t n_slots, int64_t C,
                                     int64_t S, int64_t D) {
  for (int64_t slot = blockIdx.x; slot < n_slots; slot += gridDim.x) {
    const int64_t b = slot / C;
    const int64_t p = indices[slot];
    scalar_t* dst = out + slot * D;
    if (index_ok(p, S)) {
      const scalar_t* src = x + (b * S + p) * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
    } else {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = scalar_t(0);
    }
  }
}

// ---------------------------------------------------------------------------
// gather_tokens_backward: grad_x (zero-initialised on the host) gets
// grad_x[b, indices[b, j], d] += grad_output[b, j, d]. Each thread owns one (b, d) and walks
// j = 0..C-1 in order, so duplicate indices in a row are summed deterministically without
// atomics. Each add is done in float32 (float64 for double) and rounded to the output dtype;
// with unique indices (the contract) that is one exact rounding per element.
// Launch: grid = min(B * ceil(D / threads), 2^30) blocks, task = (b, chunk of D).
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void gather_tokens_backward_kernel(const scalar_t* __restrict__ grad,
                                              const int64_t* __restrict__ indices,
                                              scalar_t* __restrict__ grad_x, int64_t B,
                                              int64_t C, int64_t S, int64_t D,
                                              int64_t n_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t task = blockIdx.x; task < B * n_chunks; task += gridDim.x) {
    const int64_t b = task / n_chunks;
    const int64_t d = (task % n_chunks) * blockDim.x + threadIdx.x;
    if (d >= D) continue;
    const int64_t* irow = indices + b * C;
    const scalar_t* g = grad + b * C * D + d;
    scalar_t* gx = grad_x + b * S * D + d;
    for (int64_t j = 0; j < C; ++j) {
      const int64_t p = irow[j];
      if (!index_ok(p, S)) continue;
      scalar_t* dst = gx + p * D;
      *dst = static_cast<scalar_t>(static_cast<acc_t>(*dst) + static_cast<acc_t>(g[j * D]));
    }
  }
}

// ---------------------------------------------------------------------------
// scatter_add_weighted: `out` holds a copy of x on entry; for every slot
// out[b, p, :] = round(x[b, p, :] + w[b, j] * y[b, j, :]) with p = indices[b, j], computed
// in acc_t (product rounded, then sum rounded, exactly like the reference).
// Indices are unique per row by contract; a row with duplicate indices is undefined on
// CUDA (one of the slots' updates wins). Out-of-range slots write nothing.
// Launch: grid = min(B*C, 2^30) blocks (grid-stride over slots), threads stride over D.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void scatter_add_weighted_kernel(const scalar_t* __restrict__ y,
                                            const int64_t* __restrict__ indices,
                                            const acc_t* __restrict__ weights,
                                            scalar_t* __restrict__ out, int64_t n_slots,
                                            int64_t C, int64_t S, int64_t D) {
  for (int64_t slot = blockIdx.x; slot < n_slots; slot += gridDim.x) {
    const int64_t p = indices[slot];
    if (!index_ok(p, S)) continue;
    const int64_t b = slot / C;
    const acc_t w = weights[slot];
    const scalar_t* yrow = y + slot * D;
    scalar_t* orow = out + (b * S + p) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t upd = mul_rn(w, static_cast<acc_t>(yrow[d]));
      orow[d] = static_cast<scalar_t>(add_rn(static_cast<acc_t>(orow[d]), upd));
    }
  }
}

// ---------------------------------------------------------------------------
// scatter_add_weighted_backward, one pass per slot (b, j), p = indices[b, j]:
//   grad_y[b, j, :]   = round(w[b, j] * grad_output[b, p, :])
//   grad_w[b, j]      = sum_d grad_output[b, p, d] * y[b, j, d]   (acc_t, block reduction)
// Out-of-range slots get zero gradients.
// Launch: grid = min(B*C, 2^30) blocks (grid-stride over slots), blockDim a multiple of 32.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void scatter_add_weighted_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
    const int64_t* __restrict__ indices, const acc_t* __restrict__ weights,
    scalar_t* __restrict__ grad_y, acc_t* __restrict__ grad_w, int64_t n_slots, int64_t C,
    int64_t S, int64_t D) {
  __shared__ acc_t scratch[32];
  for (int64_t slot = blockIdx.x; slot < n_slots; slot += gridDim.x) {
    const int64_t p = indices[slot];
    const int64_t b = slot / C;
    const acc_t w = weights[slot];
    scalar_t* gy = grad_y + slot * D;
    acc_t dot = acc_t(0);
    if (index_ok(p, S)) {  // uniform across the block
      const scalar_t* g = grad_out + (b * S + p) * D;
      const scalar_t* yrow = y + slot * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const acc_t gv = static_cast<acc_t>(g[d]);
        gy[d] = static_cast<scalar_t>(w * gv);
        dot += gv * static_cast<acc_t>(yrow[d]);
      }
    } else {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) gy[d] = scalar_t(0);
    }
    dot = block_sum(dot, scratch);  // every thread reaches this
    if (threadIdx.x == 0) grad_w[slot] = dot;
  }
}

}  // namespace

// Float dtypes accepted by the routing ops (check_route_args enforces the same set).
#define MOD_ROUTE_TYPES(...)                            \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)  \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)   \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> topk_route_cuda(const at::Tensor& router_logits,
                                                   int64_t capacity,
                                                   const std::optional<at::Tensor>& valid) {
  check_route_args("topk_route", router_logits, "router_logits", capacity, valid);
  const at::cuda::CUDAGuard guard(router_logits.device());
  const int64_t B = router_logits.size(0), S = router_logits.size(1);
  auto indices = at::empty({B, capacity}, router_logits.options().dtype(at::kLong));
  auto slot_mask = at::empty({B, capacity}, router_logits.options().dtype(at::kBool));
  if (B == 0) return {indices, slot_mask};

  const auto logits = router_logits.contiguous();
  const at::Tensor valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* vptr = valid_c.defined() ? valid_c.const_data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(logits.scalar_type(), "topk_route_cuda", MOD_ROUTE_TYPES([&] {
    topk_route_kernel<scalar_t, kRouteThreads><<<blocks_for(B), kRouteThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), vptr, B, static_cast<int>(S),
        static_cast<int>(capacity), indices.mutable_data_ptr<int64_t>(),
        slot_mask.mutable_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }));
  return {indices, slot_mask};
}

std::tuple<at::Tensor, at::Tensor> threshold_route_cuda(const at::Tensor& scores,
                                                        int64_t capacity,
                                                        const std::optional<at::Tensor>& valid) {
  check_route_args("threshold_route", scores, "scores", capacity, valid);
  const at::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), S = scores.size(1);
  auto indices = at::empty({B, capacity}, scores.options().dtype(at::kLong));
  auto slot_mask = at::empty({B, capacity}, scores.options().dtype(at::kBool));
  if (B == 0) return {indices, slot_mask};

  const auto scores_c = scores.contiguous();
  const at::Tensor valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* vptr = valid_c.defined() ? valid_c.const_data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(scores_c.scalar_type(), "threshold_route_cuda", MOD_ROUTE_TYPES([&] {
    threshold_route_kernel<scalar_t, kRouteThreads><<<blocks_for(B), kRouteThreads, 0, stream>>>(
        scores_c.const_data_ptr<scalar_t>(), vptr, B, static_cast<int>(S),
        static_cast<int>(capacity), indices.mutable_data_ptr<int64_t>(),
        slot_mask.mutable_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }));
  return {indices, slot_mask};
}

#undef MOD_ROUTE_TYPES

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& indices) {
  check_gather_args(x, indices);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), C = indices.size(1);
  auto out = at::empty({B, C, D}, x.options());
  if (B == 0 || C == 0 || D == 0) return out;

  const auto x_c = x.contiguous();
  const auto idx_c = indices.contiguous();
  const int64_t n_slots = B * C;
  const int threads = threads_for(D, 256);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  x_c.scalar_type(), "gather_tokens_cuda", [&] {
    gather_tokens_kernel<scalar_t><<<blocks_for(n_slots), threads, 0, stream>>>(
        x_c.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), n_slots, C, S, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                       int64_t seq_len) {
  check_gather_backward_args(grad_output, indices, seq_len);
  const at::cuda::CUDAGuard guard(grad_output.device());
  const int64_t B = grad_output.size(0), C = grad_output.size(1), D = grad_output.size(2);
  const int64_t S = seq_len;
  auto grad_x = at::zeros({B, S, D}, grad_output.options());
  if (B == 0 || C == 0 || D == 0 || S == 0) return grad_x;

  const auto grad_c = grad_output.contiguous();
  const auto idx_c = indices.contiguous();
  const int threads = threads_for(D, 128);
  const int64_t n_chunks = (D + threads - 1) / threads;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  grad_c.scalar_type(), "gather_tokens_backward_cuda", [&] {
    gather_tokens_backward_kernel<scalar_t><<<blocks_for(B * n_chunks), threads, 0, stream>>>(
        grad_c.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), B, C, S, D, n_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

namespace {

// Updates the indexed rows of the contiguous (B, S, D) tensor `out` in place.
void scatter_rows_cuda_(at::Tensor& out, const at::Tensor& y, const at::Tensor& indices,
                        const at::Tensor& weights) {
  const int64_t B = out.size(0), S = out.size(1), D = out.size(2), C = y.size(1);
  if (B == 0 || C == 0 || D == 0 || S == 0) return;
  const auto acc_dtype = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto w_c = weights.to(acc_dtype).contiguous();  // as the reference: weights.to(acc)
  const auto y_c = y.contiguous();
  const auto idx_c = indices.contiguous();
  const int64_t n_slots = B * C;
  const int threads = threads_for(D, 256);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  out.scalar_type(), "scatter_add_weighted_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scatter_add_weighted_kernel<scalar_t, acc_t><<<blocks_for(n_slots), threads, 0, stream>>>(
        y_c.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(),
        w_c.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n_slots, C, S, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor scatter_add_weighted_cuda(const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted", x, "x", y, indices, weights);
  const at::cuda::CUDAGuard guard(x.device());
  // Untouched rows are a bit-for-bit copy of x; the kernel updates the indexed rows in place.
  auto out = at::empty(x.sizes(), x.options());
  out.copy_(x);
  scatter_rows_cuda_(out, y, indices, weights);
  return out;
}

// In-place variant for inference: no copy of the hidden state.
void scatter_add_weighted__cuda(at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted_", x, "x", y, indices, weights);
  check_inplace_args(x, y, weights);
  const at::cuda::CUDAGuard guard(x.device());
  if (x.is_contiguous()) {
    scatter_rows_cuda_(x, y, indices, weights);
  } else {
    auto tmp = x.contiguous();
    scatter_rows_cuda_(tmp, y, indices, weights);
    x.copy_(tmp);
  }
}

std::tuple<at::Tensor, at::Tensor> scatter_add_weighted_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& y, const at::Tensor& indices,
    const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted_backward", grad_output, "grad_output", y, indices,
                     weights);
  const at::cuda::CUDAGuard guard(grad_output.device());
  const int64_t B = grad_output.size(0), S = grad_output.size(1), D = grad_output.size(2);
  const int64_t C = y.size(1);
  const auto acc_dtype = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_y = at::empty({B, C, D}, y.options());
  auto grad_w = at::empty({B, C}, weights.options().dtype(acc_dtype));
  if (B == 0 || C == 0) return {grad_y, grad_w.to(weights.scalar_type())};

  // D == 0 or S == 0 still launches: the kernel writes grad_w = 0 (and no grad_y elements,
  // or zero rows for out-of-range indices) without reading grad_output.
  const auto grad_c = grad_output.contiguous();
  const auto y_c = y.contiguous();
  const auto idx_c = indices.contiguous();
  const auto w_c = weights.to(acc_dtype).contiguous();
  const int64_t n_slots = B * C;
  const int threads = threads_for(D, 256);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  grad_c.scalar_type(), "scatter_add_weighted_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scatter_add_weighted_backward_kernel<scalar_t, acc_t>
        <<<blocks_for(n_slots), threads, 0, stream>>>(
            grad_c.const_data_ptr<scalar_t>(), y_c.const_data_ptr<scalar_t>(),
            idx_c.const_data_ptr<int64_t>(), w_c.const_data_ptr<acc_t>(),
            grad_y.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<acc_t>(), n_slots, C,
            S, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_y, grad_w.to(weights.scalar_type())};
}

}  // namespace mod_ext

TORCH_LIBRARY_IMPL(mod_ext, CUDA, m) {
  m.impl("topk_route", &mod_ext::topk_route_cuda);
  m.impl("threshold_route", &mod_ext::threshold_route_cuda);
  m.impl("gather_tokens", &mod_ext::gather_tokens_cuda);
  m.impl("gather_tokens_backward", &mod_ext::gather_tokens_backward_cuda);
  m.impl("scatter_add_weighted", &mod_ext::scatter_add_weighted_cuda);
  m.impl("scatter_add_weighted_", &mod_ext::scatter_add_weighted__cuda);
  m.impl("scatter_add_weighted_backward", &mod_ext::scatter_add_weighted_backward_cuda);
}
