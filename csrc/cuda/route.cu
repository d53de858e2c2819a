// CUDA kernels of the routing family: topk_route and threshold_route (semantics:
// mod_ext/reference.py and docs/MOD_SPEC.md; common rules: mod_ext/cuda_launch.cuh).
// Registered for the CUDA dispatch key at the bottom.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "mod_ext/build_registry.h"
#include "mod_ext/checks.h"
#include "mod_ext/cuda_launch.cuh"
#include "mod_ext/route_key.h"

namespace mod_ext {
namespace {

using cuda::blocks_for;
using cuda::kFullMask;

constexpr int kRouteThreads = 512;        // one block per row for the routing ops
constexpr int kTopkStagedThreads = 1024;  // topk_route with the keys staged in shared memory

// ---------------------------------------------------------------------------
// topk_route: radix select of the k-th largest route_key, then an ordered compaction.
// Launch: grid = min(B, 2^30) blocks (grid-stride over rows), kThreads threads per block.
// kStaged: the row's S keys are computed once into dynamic shared memory (S * 8 bytes,
// used when that fits the device's opt-in limit); otherwise every pass recomputes them
// from global memory. The selection below is the same in both cases.
//
// Pass p (p = 0..7) histograms digit p (bits [56 - 8p, 64 - 8p)) of the keys whose higher
// bits equal the prefix found so far; warp 0 then finds the digit holding the key of rank
// `remaining` (1-based, descending) and updates prefix/remaining. When the chosen bin holds
// exactly `remaining` keys, all of them win, so the threshold is the prefix with zero low
// bits and we stop early. Keys are unique, so after the passes exactly k keys are >= T.
// The compaction then writes the winners' positions in ascending order with a block scan.
//
// One block per row. Splitting a long row over several blocks (to use more SMs when B is
// small) would need a grid-wide histogram per pass, i.e. up to 8 dependent launches (each
// about as long as a whole row's pass here) or a cooperative grid sync, plus a cross-block
// ordered compaction. Not done: the complexity outweighs the gain at these row lengths.
// ---------------------------------------------------------------------------


template <bool kStaged, typename scalar_t>
__device__ __forceinline__ uint64_t token_key(const uint64_t* s_keys, const scalar_t* lrow,
                                              const bool* vrow, int t) {
  return kStaged ? s_keys[t]
                 : route_key(static_cast<float>(lrow[t]), vrow != nullptr ? vrow[t] : true, t);
}

template <typename scalar_t, int kThreads, bool kStaged>
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
  extern __shared__ __align__(16) unsigned char topk_dynamic_smem[];
  // kStaged: the S keys of the current row (the launch provides S * 8 bytes).
  uint64_t* const s_keys = reinterpret_cast<uint64_t*>(topk_dynamic_smem);

  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const scalar_t* lrow = logits + row * S;
    const bool* vrow = valid != nullptr ? valid + row * S : nullptr;

    if (kStaged) {
      for (int t = tid; t < S; t += kThreads) {
        s_keys[t] = route_key(static_cast<float>(lrow[t]), vrow != nullptr ? vrow[t] : true, t);
      }
      __syncthreads();  // s_keys complete before any pass reads it
    }

    uint64_t prefix = 0;  // digits of T found so far, in place; lower bits zero
    int remaining = k;    // rank of T among the keys that match `prefix`
    for (int pass = 0; pass < 8; ++pass) {
      const int shift = 56 - 8 * pass;
      const uint64_t hi_mask = pass == 0 ? 0ull : (~0ull << (shift + 8));
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      for (int t = tid; t < S; t += kThreads) {
        const uint64_t key = token_key<kStaged>(s_keys, lrow, vrow, t);
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
        const uint64_t key = token_key<kStaged>(s_keys, lrow, vrow, t);
        v = route_key_is_valid(key);
        win = key >= T;
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
    __syncthreads();  // hist / s_* / scan_storage / s_keys are reused by the next row
  }
}

// Dynamic shared memory (bytes) the staged topk kernel may use on `device`: the opt-in
// per-block limit minus the kernel's static shared memory, or 0 when it cannot be staged.
// Raises the kernel's dynamic shared memory limit to that once per device (the attribute
// is per device context); later calls only read the cache. Host-side attribute calls only:
// nothing is enqueued on a stream and nothing synchronises.
template <typename scalar_t>
int64_t topk_staged_smem_limit(int device) {
  static std::mutex mutex;
  static std::vector<int64_t> limit;  // per device index; -1 until configured
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) >= limit.size()) limit.resize(device + 1, -1);
  if (limit[device] < 0) {
    auto kernel = topk_route_kernel<scalar_t, kTopkStagedThreads, true>;
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int64_t optin =
        static_cast<int64_t>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin);
    int64_t avail = optin - static_cast<int64_t>(attr.sharedSizeBytes);
    if (attr.maxThreadsPerBlock < kTopkStagedThreads || avail <= 0) {
      avail = 0;
    } else {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(avail)));
    }
    limit[device] = avail;
  }
  return limit[device];
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
  const int device = static_cast<int>(router_logits.device().index());
  const int64_t key_bytes = S * static_cast<int64_t>(sizeof(uint64_t));
  auto stream = at::cuda::getCurrentCUDAStream();
  MOD_EXT_DISPATCH_ROUTE_TYPES(logits.scalar_type(), "topk_route_cuda", [&] {
    if (key_bytes <= topk_staged_smem_limit<scalar_t>(device)) {
      topk_route_kernel<scalar_t, kTopkStagedThreads, true>
          <<<blocks_for(B), kTopkStagedThreads, static_cast<size_t>(key_bytes), stream>>>(
              logits.const_data_ptr<scalar_t>(), vptr, B, static_cast<int>(S),
              static_cast<int>(capacity), indices.mutable_data_ptr<int64_t>(),
              slot_mask.mutable_data_ptr<bool>());
    } else {
      topk_route_kernel<scalar_t, kRouteThreads, false><<<blocks_for(B), kRouteThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), vptr, B, static_cast<int>(S),
          static_cast<int>(capacity), indices.mutable_data_ptr<int64_t>(),
          slot_mask.mutable_data_ptr<bool>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
  MOD_EXT_DISPATCH_ROUTE_TYPES(scores_c.scalar_type(), "threshold_route_cuda", [&] {
    threshold_route_kernel<scalar_t, kRouteThreads><<<blocks_for(B), kRouteThreads, 0, stream>>>(
        scores_c.const_data_ptr<scalar_t>(), vptr, B, static_cast<int>(S),
        static_cast<int>(capacity), indices.mutable_data_ptr<int64_t>(),
        slot_mask.mutable_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, slot_mask};
}


}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, CUDA, m) {
  m.impl("topk_route", &topk_route_cuda);
  m.impl("threshold_route", &threshold_route_cuda);
}
MOD_EXT_REGISTER_FAMILY(route, cuda);

}  // namespace mod_ext
