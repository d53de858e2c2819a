// CUDA kernels of the rows family: gather_tokens, scatter_add_weighted (out of place and
// in place) and their backward ops (semantics: mod_ext/reference.py and docs/MOD_SPEC.md;
// common rules: mod_ext/cuda_launch.cuh). Registered for the CUDA dispatch key at the bottom.
//
// An index outside [0, S) cannot be checked without a host sync. On CUDA such a slot reads
// zeros (gather), writes nothing (scatter, gather backward) and gets zero gradients.
//
// Row kernels (gather / scatter and their backward ops) move whole D-rows. A row is handled
// by blockDim.x threads (a multiple of 32; blockDim.y rows share a block) that access it in
// "vectors" of N elements: N = 16 / sizeof(scalar_t) (16-byte loads and stores) when the
// host has checked that every base pointer the kernel touches is 16-byte aligned and
// D * sizeof(scalar_t) is a multiple of 16 (so D % N == 0 and every row start is aligned),
// N = 1 (plain element accesses) otherwise. Either way a row is exactly D / N vectors: the
// vector path has no tail, and the N = 1 path is the scalar path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "mod_ext/build_registry.h"
#include "mod_ext/checks.h"
#include "mod_ext/cuda_launch.cuh"

namespace mod_ext {
namespace {

using cuda::blocks_for;
using cuda::kFullMask;

constexpr int kRowThreads = 256;          // threads per block of the row kernels
// Vectors a thread of a row kernel loads before it stores: kUnroll when it copies one row
// (one 16-byte load per vector), kComputeUnroll when it reads two rows per vector (x and y,
// or grad and y), so that both keep 64 bytes a thread in flight. Block shapes are sized
// for kUnroll vectors a thread (row_launch).
constexpr int kUnroll = 4;
constexpr int kComputeUnroll = 2;
// Row kernels are compiled for kRowMinBlocks resident blocks per SM (<= 64 registers a
// thread, no spills), so that enough loads are in flight to approach the copy bandwidth.
constexpr int kRowMinBlocks = 4;

__device__ __forceinline__ bool index_ok(int64_t p, int64_t S) { return p >= 0 && p < S; }

// Correctly rounded multiply / add that nvcc may not contract into an FMA, so that
// x + w * y rounds exactly like the reference (a product tensor, then scatter_add).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ---------------------------------------------------------------------------
// Vectors for the row kernels (see the top of the file). A vector of N elements is loaded
// and stored as one raw access of sizeof(scalar_t) * N bytes (uint4 for 16 bytes) and its
// elements are read and written by bit copies, so a vector occupies sizeof / 4 registers.
// ---------------------------------------------------------------------------
template <int kBytes>
struct RawBits;
template <>
struct RawBits<2> {
  using type = uint16_t;
};
template <>
struct RawBits<4> {
  using type = uint32_t;
};
template <>
struct RawBits<8> {
  using type = uint2;
};
template <>
struct RawBits<16> {
  using type = uint4;
};

template <typename scalar_t, int N>
struct VecOps {
  using raw_t = typename RawBits<static_cast<int>(sizeof(scalar_t)) * N>::type;
  static_assert(sizeof(raw_t) == sizeof(scalar_t) * N, "raw vector size");
  static_assert(alignof(raw_t) == sizeof(raw_t), "raw vector alignment = its size");

  // Element e of r (bit copy).
  static __device__ __forceinline__ scalar_t get(const raw_t& r, int e) {
    scalar_t s;
    memcpy(&s, reinterpret_cast<const unsigned char*>(&r) + e * sizeof(scalar_t),
           sizeof(scalar_t));
    return s;
  }
  // Sets element e of r to s (bit copy).
  static __device__ __forceinline__ void set(raw_t& r, int e, scalar_t s) {
    memcpy(reinterpret_cast<unsigned char*>(&r) + e * sizeof(scalar_t), &s, sizeof(scalar_t));
  }
  // All-zero bits: +0.0 in every floating-point format we dispatch.
  static __device__ __forceinline__ raw_t zero() {
    raw_t r;
    memset(&r, 0, sizeof(r));
    return r;
  }
};

// Elements per 16-byte vector: 2 (double), 4 (float), 8 (half, bfloat16).
template <typename scalar_t>
constexpr int vec16_elems() {
  static_assert(16 % sizeof(scalar_t) == 0, "element size must divide 16");
  return static_cast<int>(16 / sizeof(scalar_t));
}

// True when a row kernel may use 16-byte vectors: every row of D elements starts on a
// 16-byte boundary for every base pointer in `ptrs` (row r starts at base + r * D elements).
template <typename scalar_t>
bool vectorizable(int64_t D, std::initializer_list<const void*> ptrs) {
  if ((D * static_cast<int64_t>(sizeof(scalar_t))) % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Calls launch(std::integral_constant<int, N>{}) with N = 16-byte vector width when
// `vec` holds, else N = 1.
template <typename scalar_t, typename F>
void with_vec_width(bool vec, F&& launch) {
  if (vec) {
    launch(std::integral_constant<int, vec16_elems<scalar_t>()>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Block shape and grid of a row kernel over n_rows rows of `units` vectors each:
// blockDim.x = threads per row, a multiple of 32 in [32, kRowThreads], about units / kUnroll;
// blockDim.y = rows per block = kRowThreads / blockDim.x; grid-stride over groups of rows.
struct RowLaunch {
  dim3 block;
  unsigned grid;
};

inline RowLaunch row_launch(int64_t n_rows, int64_t units) {
  const int64_t want = (units + kUnroll - 1) / kUnroll;
  const int64_t tx = std::max<int64_t>(32, std::min<int64_t>((want + 31) / 32 * 32, kRowThreads));
  const int64_t ty = kRowThreads / tx;
  return {dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty)),
          blocks_for((n_rows + ty - 1) / ty)};
}

// Visits the vectors i of a row of nv vectors that this thread owns (i = threadIdx.x +
// k * blockDim.x, k = 0, 1, ...), each exactly once: in groups of U while a whole group is
// in range, full(i0, step) handling vectors i0 + u * step for u < U (so it can issue its U
// loads before its stores, with no bounds checks); then one(i) for each remaining vector
// (fewer than U).
template <int U, typename Full, typename One>
__device__ __forceinline__ void for_row_vectors(int64_t nv, Full&& full, One&& one) {
  const int64_t step = blockDim.x;
  int64_t i = threadIdx.x;
  for (; i + (U - 1) * step < nv; i += U * step) full(i, step);
  for (; i < nv; i += step) one(i);
}

// dst[i] = src[i] for the vectors of a row owned by this thread (bit copy).
template <typename raw_t>
__device__ __forceinline__ void copy_row(const raw_t* __restrict__ src, raw_t* __restrict__ dst,
                                         int64_t nv) {
  for_row_vectors<kUnroll>(
      nv,
      [&](int64_t i0, int64_t step) {
        raw_t r[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) r[u] = src[i0 + u * step];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) dst[i0 + u * step] = r[u];
      },
      [&](int64_t i) { dst[i] = src[i]; });
}

template <typename scalar_t, int N>
__device__ __forceinline__ void zero_row(typename VecOps<scalar_t, N>::raw_t* __restrict__ dst,
                                         int64_t nv) {
  const auto z = VecOps<scalar_t, N>::zero();
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) dst[i] = z;
}

// round(x + w * y) elementwise in acc_t: product rounded, then sum rounded, then one
// rounding to scalar_t (exactly like the reference). Vectors are taken by value: with a
// reference into global memory the bit copies would read it byte by byte.
template <typename scalar_t, typename acc_t, int N>
__device__ __forceinline__ typename VecOps<scalar_t, N>::raw_t axpy_vec(
    const typename VecOps<scalar_t, N>::raw_t x, acc_t w,
    const typename VecOps<scalar_t, N>::raw_t y) {
  using Ops = VecOps<scalar_t, N>;
  typename Ops::raw_t o;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const acc_t upd = mul_rn(w, static_cast<acc_t>(Ops::get(y, e)));
    Ops::set(o, e, static_cast<scalar_t>(add_rn(static_cast<acc_t>(Ops::get(x, e)), upd)));
  }
  return o;
}

// out[i] = axpy_vec(x[i], w, y[i]) for the vectors of a row owned by this thread. `out` may
// equal `x` (in place): each vector is read and then written by the same thread.
template <typename scalar_t, typename acc_t, int N>
__device__ __forceinline__ void axpy_row(const typename VecOps<scalar_t, N>::raw_t* x, acc_t w,
                                         const typename VecOps<scalar_t, N>::raw_t* __restrict__ y,
                                         typename VecOps<scalar_t, N>::raw_t* out, int64_t nv) {
  using raw_t = typename VecOps<scalar_t, N>::raw_t;
  for_row_vectors<kComputeUnroll>(
      nv,
      [&](int64_t i0, int64_t step) {
        raw_t xv[kComputeUnroll], yv[kComputeUnroll];
#pragma unroll
        for (int u = 0; u < kComputeUnroll; ++u) {
          xv[u] = x[i0 + u * step];
          yv[u] = y[i0 + u * step];
        }
#pragma unroll
        for (int u = 0; u < kComputeUnroll; ++u) {
          out[i0 + u * step] = axpy_vec<scalar_t, acc_t, N>(xv[u], w, yv[u]);
        }
      },
      [&](int64_t i) { out[i] = axpy_vec<scalar_t, acc_t, N>(x[i], w, y[i]); });
}

// Sum of v over the blockDim.x threads of the calling thread's row (threadIdx.y); the
// result is valid in the row's thread threadIdx.x == 0. blockDim.x must be a multiple of 32
// so that every warp lies in one row; `scratch` holds one value per warp of the block (at
// most 32). Every thread of the block must call it (it contains __syncthreads); the
// trailing one lets the caller reuse scratch right away. Fixed reduction order, so
// deterministic for a given block shape.
template <typename T>
__device__ __forceinline__ T row_sum(T v, T* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  const int warps_per_row = blockDim.x >> 5;
  const int first = threadIdx.y * warps_per_row;
  if ((threadIdx.x & 31) == 0) scratch[first + (threadIdx.x >> 5)] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    v = scratch[first];
    for (int w = 1; w < warps_per_row; ++w) v += scratch[first + w];
  }
  __syncthreads();
  return v;
}

// ---------------------------------------------------------------------------
// Row map for the ops that write every row of a (B, S, D) output (scatter_add_weighted,
// gather_tokens_backward), so that one pass writes each output row exactly once:
//   row_map[b, s] = j           when exactly one in-range slot j of row b has indices[b, j] == s
//                 = kNoSlot     when none has
//                 = kManySlots  when several have (duplicate indices)
// Built from a kNoSlot-filled (B, S) int64 tensor: the first slot to arrive claims the
// entry with a compare-and-swap, every later one marks it kManySlots. The entry never
// returns to kNoSlot, so exactly one CAS succeeds per entry and the final value is as above
// whatever the arrival order.
// Launch: 1D grid-stride over the B*C slots.
// ---------------------------------------------------------------------------
constexpr int64_t kNoSlot = -1;
constexpr int64_t kManySlots = -2;

__global__ void build_row_map_kernel(const int64_t* __restrict__ indices,
                                     int64_t* __restrict__ row_map, int64_t n_slots, int64_t C,
                                     int64_t S) {
  using ull = unsigned long long;
  static_assert(sizeof(ull) == sizeof(int64_t), "64-bit atomics on the int64 row map");
  for (int64_t slot = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; slot < n_slots;
       slot += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = indices[slot];
    if (!index_ok(p, S)) continue;
    const int64_t b = slot / C;
    const int64_t j = slot - b * C;
    ull* cell = reinterpret_cast<ull*>(row_map + b * S + p);
    const ull none = static_cast<ull>(kNoSlot);
    if (atomicCAS(cell, none, static_cast<ull>(j)) != none) {
      atomicExch(cell, static_cast<ull>(kManySlots));
    }
  }
}

at::Tensor build_row_map(const at::Tensor& idx_c, int64_t B, int64_t S, int64_t C,
                         cudaStream_t stream) {
  auto row_map = at::full({B, S}, kNoSlot, idx_c.options());  // int64, on the current stream
  const int64_t n_slots = B * C;
  constexpr int kThreads = 256;
  build_row_map_kernel<<<blocks_for((n_slots + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      idx_c.const_data_ptr<int64_t>(), row_map.mutable_data_ptr<int64_t>(), n_slots, C, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return row_map;
}

// ---------------------------------------------------------------------------
// gather_tokens: out[b, j, :] = x[b, indices[b, j], :] (zeros for an out-of-range index).
// Launch: row_launch(B*C, D / N); one row of threads per slot, grid-stride over slots.
// ---------------------------------------------------------------------------
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
gather_tokens_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ indices,
                     scalar_t* __restrict__ out, int64_t n_slots, int64_t C, int64_t S,
                     int64_t D) {
  using raw_t = typename VecOps<scalar_t, N>::raw_t;
  const int64_t nv = D / N;
  for (int64_t slot = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; slot < n_slots;
       slot += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = slot / C;
    const int64_t p = indices[slot];
    raw_t* dst = reinterpret_cast<raw_t*>(out + slot * D);
    if (index_ok(p, S)) {
      copy_row(reinterpret_cast<const raw_t*>(x + (b * S + p) * D), dst, nv);
    } else {
      zero_row<scalar_t, N>(dst, nv);
    }
  }
}

// round(0 + g) elementwise in acc_t (the first, and with unique indices the only, add of
// gather_tokens_backward; it turns -0.0 into +0.0 exactly like zeros().scatter_add_()).
template <typename scalar_t, int N>
__device__ __forceinline__ typename VecOps<scalar_t, N>::raw_t add_to_zero_vec(
    const typename VecOps<scalar_t, N>::raw_t g) {  // by value, as axpy_vec
  using Ops = VecOps<scalar_t, N>;
  using acc_t = at::opmath_type<scalar_t>;
  typename Ops::raw_t o;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    Ops::set(o, e, static_cast<scalar_t>(add_rn(acc_t(0), static_cast<acc_t>(Ops::get(g, e)))));
  }
  return o;
}

// Row s of batch row b of gather_tokens_backward when several slots point at it:
// dst[d] = 0, then dst[d] = round(dst[d] + g[j, d]) in acc_t for every slot j (in order) with
// irow[j] == s. grow = grad_output[b] (C x D), irow = indices[b]. Kept out of line: it is
// rare, and inlining it would cost the common paths registers.
template <typename scalar_t, int N>
__device__ __noinline__ void gather_backward_many_row(
    const scalar_t* __restrict__ grow, const int64_t* __restrict__ irow, int64_t s, int64_t C,
    int64_t D, typename VecOps<scalar_t, N>::raw_t* __restrict__ dst) {
  using Ops = VecOps<scalar_t, N>;
  using raw_t = typename Ops::raw_t;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nv = D / N;
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    raw_t cur = Ops::zero();
    for (int64_t j = 0; j < C; ++j) {
      if (irow[j] != s) continue;
      const raw_t g = reinterpret_cast<const raw_t*>(grow + j * D)[i];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        Ops::set(cur, e,
                 static_cast<scalar_t>(add_rn(static_cast<acc_t>(Ops::get(cur, e)),
                                              static_cast<acc_t>(Ops::get(g, e)))));
      }
    }
    dst[i] = cur;
  }
}

// ---------------------------------------------------------------------------
// gather_tokens_backward: grad_x = zeros; grad_x[b, indices[b, j], d] += grad_output[b, j, d]
// for j = 0..C-1 in order, each add done in acc_t (float32, float64 for double) and rounded
// to the output dtype (with unique indices, the contract, that is one exact rounding of
// 0 + g per element). One pass over the B*S rows of grad_x with the row map, so every row
// is written exactly once (no separate zero fill, no atomics, deterministic):
//   kNoSlot    -> zeros
//   slot j     -> round(0 + grad_output[b, j])
//   kManySlots -> walk j = 0..C-1 in order and accumulate every slot with indices == s
// Out-of-range slots are not in the row map, so they write nothing.
// Launch: row_launch(B*S, D / N); one row of threads per row of grad_x, grid-stride.
// ---------------------------------------------------------------------------
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
gather_tokens_backward_kernel(const scalar_t* __restrict__ grad,
                              const int64_t* __restrict__ indices,
                              const int64_t* __restrict__ row_map,
                              scalar_t* __restrict__ grad_x, int64_t n_rows, int64_t C,
                              int64_t S, int64_t D) {
  using raw_t = typename VecOps<scalar_t, N>::raw_t;
  const int64_t nv = D / N;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < n_rows;
       r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t m = row_map[r];
    raw_t* dst = reinterpret_cast<raw_t*>(grad_x + r * D);
    if (m == kNoSlot) {
      zero_row<scalar_t, N>(dst, nv);
      continue;
    }
    const int64_t b = r / S;
    if (m >= 0) {
      const raw_t* src = reinterpret_cast<const raw_t*>(grad + (b * C + m) * D);
      for_row_vectors<kUnroll>(
          nv,
          [&](int64_t i0, int64_t step) {
            raw_t g[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) g[u] = src[i0 + u * step];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              dst[i0 + u * step] = add_to_zero_vec<scalar_t, N>(g[u]);
            }
          },
          [&](int64_t i) { dst[i] = add_to_zero_vec<scalar_t, N>(src[i]); });
    } else {  // kManySlots: duplicate indices in row b (allowed for gather; rare)
      gather_backward_many_row<scalar_t, N>(grad + b * C * D, indices + b * C, r - b * S, C, D,
                                            dst);
    }
  }
}

// ---------------------------------------------------------------------------
// scatter_add_weighted, in place on the routed rows (scatter_add_weighted_): for every slot
// out[b, p, :] = round(out[b, p, :] + w[b, j] * y[b, j, :]) with p = indices[b, j], computed
// in acc_t (product rounded, then sum rounded, exactly like the reference).
// Indices are unique per row by contract; a row with duplicate indices is undefined here
// (one of the slots' updates wins). Out-of-range slots write nothing.
// Launch: row_launch(B*C, D / N); one row of threads per slot, grid-stride over slots.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
scatter_add_weighted_inplace_kernel(const scalar_t* __restrict__ y,
                                    const int64_t* __restrict__ indices,
                                    const acc_t* __restrict__ weights, scalar_t* out,
                                    int64_t n_slots, int64_t C, int64_t S, int64_t D) {
  using raw_t = typename VecOps<scalar_t, N>::raw_t;
  const int64_t nv = D / N;
  for (int64_t slot = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; slot < n_slots;
       slot += int64_t(gridDim.x) * blockDim.y) {
    const int64_t p = indices[slot];
    if (!index_ok(p, S)) continue;
    const int64_t b = slot / C;
    raw_t* orow = reinterpret_cast<raw_t*>(out + (b * S + p) * D);
    axpy_row<scalar_t, acc_t, N>(orow, weights[slot],
                                 reinterpret_cast<const raw_t*>(y + slot * D), orow, nv);
  }
}

// Row s of batch row b of scatter_add_weighted (out of place) when several slots point at
// it (outside the contract): acc = x, then acc = add_rn(acc, mul_rn(w[j], y[j])) for every
// slot j (in order) with irow[j] == s, rounded once. yb = y[b] (C x D), irow = indices[b],
// wrow = weights[b]. Out of line for the same reason as gather_backward_many_row.
template <typename scalar_t, typename acc_t, int N>
__device__ __noinline__ void scatter_many_row(
    const typename VecOps<scalar_t, N>::raw_t* __restrict__ xrow, const scalar_t* __restrict__ yb,
    const int64_t* __restrict__ irow, const acc_t* __restrict__ wrow, int64_t s, int64_t C,
    int64_t D, typename VecOps<scalar_t, N>::raw_t* __restrict__ orow) {
  using Ops = VecOps<scalar_t, N>;
  using raw_t = typename Ops::raw_t;
  const int64_t nv = D / N;
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    const raw_t xv = xrow[i];
    acc_t acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = static_cast<acc_t>(Ops::get(xv, e));
    for (int64_t j = 0; j < C; ++j) {
      if (irow[j] != s) continue;
      const acc_t w = wrow[j];
      const raw_t yv = reinterpret_cast<const raw_t*>(yb + j * D)[i];
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = add_rn(acc[e], mul_rn(w, static_cast<acc_t>(Ops::get(yv, e))));
    }
    raw_t o;
#pragma unroll
    for (int e = 0; e < N; ++e) Ops::set(o, e, static_cast<scalar_t>(acc[e]));
    orow[i] = o;
  }
}

// ---------------------------------------------------------------------------
// scatter_add_weighted, out of place, in one pass over the B*S rows of `out` with the row
// map (every row read from x and written exactly once, instead of a full copy of x
// followed by read-modify-write of the routed rows):
//   kNoSlot    -> out row = x row, bit for bit
//   slot j     -> out row = round(x + w[b, j] * y[b, j]) in acc_t (product rounded, then sum
//                 rounded, exactly like the reference)
//   kManySlots -> duplicate indices (outside the contract): scatter_many_row
// Out-of-range slots are not in the row map, so they write nothing.
// Launch: row_launch(B*S, D / N); one row of threads per row of out, grid-stride.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
scatter_add_weighted_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                            const int64_t* __restrict__ indices,
                            const acc_t* __restrict__ weights,
                            const int64_t* __restrict__ row_map, scalar_t* __restrict__ out,
                            int64_t n_rows, int64_t C, int64_t S, int64_t D) {
  using raw_t = typename VecOps<scalar_t, N>::raw_t;
  const int64_t nv = D / N;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < n_rows;
       r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t m = row_map[r];
    const raw_t* xrow = reinterpret_cast<const raw_t*>(x + r * D);
    raw_t* orow = reinterpret_cast<raw_t*>(out + r * D);
    if (m == kNoSlot) {
      copy_row(xrow, orow, nv);
      continue;
    }
    const int64_t b = r / S;
    if (m >= 0) {
      const int64_t slot = b * C + m;
      axpy_row<scalar_t, acc_t, N>(xrow, weights[slot],
                                   reinterpret_cast<const raw_t*>(y + slot * D), orow, nv);
    } else {  // kManySlots
      scatter_many_row<scalar_t, acc_t, N>(xrow, y + b * C * D, indices + b * C,
                                           weights + b * C, r - b * S, C, D, orow);
    }
  }
}

// ---------------------------------------------------------------------------
// scatter_add_weighted_backward, one pass per slot (b, j), p = indices[b, j]:
//   grad_y[b, j, :]   = round(w[b, j] * grad_output[b, p, :])
//   grad_w[b, j]      = sum_d grad_output[b, p, d] * y[b, j, d]   (acc_t, row reduction)
// Out-of-range slots get zero gradients.
// Launch: row_launch(B*C, D / N). The loop runs over groups of blockDim.y slots with a
// block-uniform trip count, because row_sum synchronises the whole block.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
scatter_add_weighted_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
    const int64_t* __restrict__ indices, const acc_t* __restrict__ weights,
    scalar_t* __restrict__ grad_y, acc_t* __restrict__ grad_w, int64_t n_slots, int64_t C,
    int64_t S, int64_t D) {
  __shared__ acc_t scratch[32];
  using Ops = VecOps<scalar_t, N>;
  using raw_t = typename Ops::raw_t;
  const int64_t nv = D / N;
  const int64_t rows = blockDim.y;
  const int64_t n_groups = (n_slots + rows - 1) / rows;
  for (int64_t grp = blockIdx.x; grp < n_groups; grp += gridDim.x) {  // uniform in the block
    const int64_t slot = grp * rows + threadIdx.y;
    const bool active = slot < n_slots;  // uniform in the row
    acc_t dot = acc_t(0);
    if (active) {
      const int64_t p = indices[slot];
      raw_t* gy = reinterpret_cast<raw_t*>(grad_y + slot * D);
      if (index_ok(p, S)) {
        const int64_t b = slot / C;
        const acc_t w = weights[slot];
        const raw_t* g = reinterpret_cast<const raw_t*>(grad_out + (b * S + p) * D);
        const raw_t* yrow = reinterpret_cast<const raw_t*>(y + slot * D);
        // grad_y vector i from the loaded grad / y vectors (by value, as axpy_vec); adds
        // their elementwise products to dot.
        auto emit = [&](int64_t i, const raw_t gv, const raw_t yv) {
          raw_t o;
#pragma unroll
          for (int e = 0; e < N; ++e) {
            const acc_t a = static_cast<acc_t>(Ops::get(gv, e));
            Ops::set(o, e, static_cast<scalar_t>(mul_rn(w, a)));
            dot += a * static_cast<acc_t>(Ops::get(yv, e));
          }
          gy[i] = o;
        };
        for_row_vectors<kComputeUnroll>(
            nv,
            [&](int64_t i0, int64_t step) {
              raw_t gv[kComputeUnroll], yv[kComputeUnroll];
#pragma unroll
              for (int u = 0; u < kComputeUnroll; ++u) {
                gv[u] = g[i0 + u * step];
                yv[u] = yrow[i0 + u * step];
              }
#pragma unroll
              for (int u = 0; u < kComputeUnroll; ++u) emit(i0 + u * step, gv[u], yv[u]);
            },
            [&](int64_t i) { emit(i, g[i], yrow[i]); });
      } else {
        zero_row<scalar_t, N>(gy, nv);
      }
    }
    dot = row_sum(dot, scratch);  // every thread of the block reaches this
    if (active && threadIdx.x == 0) grad_w[slot] = dot;
  }
}



at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& indices) {
  check_gather_args(x, indices);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), C = indices.size(1);
  auto out = at::empty({B, C, D}, x.options());
  if (B == 0 || C == 0 || D == 0) return out;

  const auto x_c = x.contiguous();
  const auto idx_c = indices.contiguous();
  const int64_t n_slots = B * C;
  auto stream = at::cuda::getCurrentCUDAStream();
  MOD_EXT_DISPATCH_DATA_TYPES(x_c.scalar_type(), "gather_tokens_cuda", [&] {
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_vec_width<scalar_t>(vectorizable<scalar_t>(D, {xp, op}), [&](auto width) {
      constexpr int N = decltype(width)::value;
      const RowLaunch cfg = row_launch(n_slots, D / N);
      gather_tokens_kernel<scalar_t, N><<<cfg.grid, cfg.block, 0, stream>>>(
          xp, idx_c.const_data_ptr<int64_t>(), op, n_slots, C, S, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                       int64_t seq_len) {
  check_gather_backward_args(grad_output, indices, seq_len);
  const at::cuda::CUDAGuard guard(grad_output.device());
  const int64_t B = grad_output.size(0), C = grad_output.size(1), D = grad_output.size(2);
  const int64_t S = seq_len;
  // Every element is written below (or by zero_() when no slot exists).
  auto grad_x = at::empty({B, S, D}, grad_output.options());
  if (B == 0 || S == 0 || D == 0) return grad_x;  // no elements
  if (C == 0) return grad_x.zero_();

  const auto grad_c = grad_output.contiguous();
  const auto idx_c = indices.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto row_map = build_row_map(idx_c, B, S, C, stream);
  const int64_t n_rows = B * S;
  MOD_EXT_DISPATCH_DATA_TYPES(grad_c.scalar_type(), "gather_tokens_backward_cuda", [&] {
    const scalar_t* gp = grad_c.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    with_vec_width<scalar_t>(vectorizable<scalar_t>(D, {gp, gxp}), [&](auto width) {
      constexpr int N = decltype(width)::value;
      const RowLaunch cfg = row_launch(n_rows, D / N);
      gather_tokens_backward_kernel<scalar_t, N><<<cfg.grid, cfg.block, 0, stream>>>(
          gp, idx_c.const_data_ptr<int64_t>(), row_map.const_data_ptr<int64_t>(), gxp, n_rows,
          C, S, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_x;
}


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
  auto stream = at::cuda::getCurrentCUDAStream();
  MOD_EXT_DISPATCH_DATA_TYPES(out.scalar_type(), "scatter_add_weighted_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y_c.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_vec_width<scalar_t>(vectorizable<scalar_t>(D, {yp, op}), [&](auto width) {
      constexpr int N = decltype(width)::value;
      const RowLaunch cfg = row_launch(n_slots, D / N);
      scatter_add_weighted_inplace_kernel<scalar_t, acc_t, N><<<cfg.grid, cfg.block, 0, stream>>>(
          yp, idx_c.const_data_ptr<int64_t>(), w_c.const_data_ptr<acc_t>(), op, n_slots, C, S,
          D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}


at::Tensor scatter_add_weighted_cuda(const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted", x, "x", y, indices, weights);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), C = y.size(1);
  auto out = at::empty(x.sizes(), x.options());  // contiguous
  if (B == 0 || S == 0 || D == 0) return out;    // no elements
  if (C == 0) {
    out.copy_(x);  // no slots: a bit-for-bit copy of x
    return out;
  }

  // Untouched rows are a bit-for-bit copy of x; the kernel writes every row of out once.
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto w_c = weights.to(acc_dtype).contiguous();  // as the reference: weights.to(acc)
  const auto x_c = x.contiguous();
  const auto y_c = y.contiguous();
  const auto idx_c = indices.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto row_map = build_row_map(idx_c, B, S, C, stream);
  const int64_t n_rows = B * S;
  MOD_EXT_DISPATCH_DATA_TYPES(x_c.scalar_type(), "scatter_add_weighted_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    const scalar_t* yp = y_c.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_vec_width<scalar_t>(vectorizable<scalar_t>(D, {xp, yp, op}), [&](auto width) {
      constexpr int N = decltype(width)::value;
      const RowLaunch cfg = row_launch(n_rows, D / N);
      scatter_add_weighted_kernel<scalar_t, acc_t, N><<<cfg.grid, cfg.block, 0, stream>>>(
          xp, yp, idx_c.const_data_ptr<int64_t>(), w_c.const_data_ptr<acc_t>(),
          row_map.const_data_ptr<int64_t>(), op, n_rows, C, S, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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
  auto stream = at::cuda::getCurrentCUDAStream();
  MOD_EXT_DISPATCH_DATA_TYPES(grad_c.scalar_type(), "scatter_add_weighted_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* yp = y_c.const_data_ptr<scalar_t>();
    scalar_t* gyp = grad_y.mutable_data_ptr<scalar_t>();
    with_vec_width<scalar_t>(vectorizable<scalar_t>(D, {gp, yp, gyp}), [&](auto width) {
      constexpr int N = decltype(width)::value;
      const RowLaunch cfg = row_launch(n_slots, D / N);
      scatter_add_weighted_backward_kernel<scalar_t, acc_t, N>
          <<<cfg.grid, cfg.block, 0, stream>>>(
              gp, yp, idx_c.const_data_ptr<int64_t>(), w_c.const_data_ptr<acc_t>(), gyp,
              grad_w.mutable_data_ptr<acc_t>(), n_slots, C, S, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_y, grad_w.to(weights.scalar_type())};
}


}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cuda);
  m.impl("scatter_add_weighted", &scatter_add_weighted_cuda);
  m.impl("scatter_add_weighted_", &scatter_add_weighted__cuda);
  m.impl("scatter_add_weighted_backward", &scatter_add_weighted_backward_cuda);
}
MOD_EXT_REGISTER_FAMILY(rows, cuda);

}  // namespace mod_ext
