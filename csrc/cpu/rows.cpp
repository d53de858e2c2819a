// CPU kernels of the rows family: gather_tokens, scatter_add_weighted (out of place and
// in place) and their backward ops. Schemas: registration.cpp. Semantics:
// mod_ext/reference.py (the oracles the tests compare against).
//
// Every kernel is parallel over rows (at::parallel_for), works on contiguous copies of
// its inputs (the backward kernels read the incoming gradient with its own strides),
// accumulates in float32 (float64 for double) and rounds once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mod_ext/build_registry.h"
#include "mod_ext/checks.h"

namespace mod_ext {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows per task so that each task moves at least ~32 KB (elementwise row loops).
inline int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));
}

// ---------------------------------------------------------------------------
// Index validation and slot maps, shared by gather and scatter.
// ---------------------------------------------------------------------------

// Bounds check (CPU only; CUDA cannot raise without a sync). The scan is a branch-free
// OR over all indices; only when it fails is the first bad index searched for the message.
inline void check_index_range(const char* op, const at::Tensor& indices, int64_t S) {
  const int64_t n = indices.numel();
  if (n == 0) return;
  const int64_t* p = indices.data_ptr<int64_t>();
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(p[i]) >= static_cast<uint64_t>(S);
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    MOD_CHECK(p[i] >= 0 && p[i] < S, op, ": indices must lie in [0, S) = [0, ", S,
              "), got ", p[i], " at flat position ", i);
  }
}

// The slot map of (B, C) indices already known to lie in [0, S): slot[b * S + s] is the
// first slot j with indices[b, j] == s, or -1 when no slot points at s. Lets a kernel
// write every row of a (B, S, D) output exactly once, in parallel over rows.
// With `unique`, a repeated position in a row is an error (scatter_add_weighted's
// contract); otherwise `has_repeats` (size B) flags the rows that repeat a position.
std::vector<int64_t> build_slot_map(const char* op, const at::Tensor& indices, int64_t S,
                                    bool unique, std::vector<uint8_t>* has_repeats = nullptr) {
  const int64_t B = indices.size(0), C = indices.size(1);
  std::vector<int64_t> slot(static_cast<size_t>(B * S));
  std::vector<int64_t> repeated(static_cast<size_t>(B), -1);  // first repeated position per row
  const int64_t* ip = indices.data_ptr<int64_t>();
  // ~(S + C) steps per row; rows are batched so each task does at least ~64k steps.
  at::parallel_for(0, B, std::max<int64_t>(1, (int64_t(1) << 16) / (S + C + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* row = slot.data() + b * S;
      std::fill(row, row + S, int64_t(-1));
      for (int64_t j = 0; j < C; ++j) {
        const int64_t s = ip[b * C + j];
        if (row[s] < 0) {
          row[s] = j;
        } else if (repeated[b] < 0) {
          repeated[b] = s;
        }
      }
    }
  });
  // Report the first offending row, as a serial scan would.
  for (int64_t b = 0; b < B; ++b) {
    MOD_CHECK(!unique || repeated[b] < 0, op, ": indices must be unique within each row; row ", b,
              " repeats position ", repeated[b]);
    if (has_repeats) has_repeats->push_back(repeated[b] >= 0);
  }
  return slot;
}

// The end of the run of rows that no slot points at (slot < 0) starting at r, at most `end`.
inline int64_t unrouted_run_end(const int64_t* slot, int64_t r, int64_t end) {
  while (r < end && slot[r] < 0) ++r;
  return r;
}

// Outputs at least this large are copied with non-temporal stores (see copy_bytes).
constexpr size_t kStreamBytes = size_t(4) << 20;

// memcpy; with `stream` (x86-64) the bulk goes through non-temporal stores, which write
// whole cache lines without first reading them (no read-for-ownership): a third less
// memory traffic for a large output written once. Call stream_fence() when done.
inline void copy_bytes(void* dst, const void* src, size_t n, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const size_t head = std::min(n, static_cast<size_t>(-reinterpret_cast<uintptr_t>(d) & 15));
    std::memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
      for (int k = 0; k < 64; k += 16) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + k),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
      }
    }
    std::memcpy(d, s, n);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// memset(dst, 0, n); with `stream` (x86-64) through non-temporal stores, as copy_bytes.
inline void zero_bytes(void* dst, size_t n, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    char* d = static_cast<char*>(dst);
    const size_t head = std::min(n, static_cast<size_t>(-reinterpret_cast<uintptr_t>(d) & 15));
    std::memset(d, 0, head);
    d += head, n -= head;
    const __m128i z = _mm_setzero_si128();
    for (; n >= 64; n -= 64, d += 64) {
      for (int k = 0; k < 64; k += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), z);
    }
    std::memset(d, 0, n);
    return;
  }
#endif
  std::memset(dst, 0, n);
}

// Orders this thread's non-temporal stores before whatever follows.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------
// Rows as acc values. The row kernels below work on chunks of kChunk elements in acc
// precision: a float32/float64 row is used in place; a float16/bfloat16 chunk is
// converted into a small buffer first and the results converted back (one rounding).
// float16 uses the F16C instructions where the CPU has them: the scalar conversion
// (the extension is built for baseline x86-64) costs ~15 instructions per element.
// ---------------------------------------------------------------------------
constexpr int64_t kChunk = 256;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOD_EXT_F16C 1
// Compiled for AVX + F16C (not FMA), called only when the CPU has them.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const at::Half* src, float* dst,
                                                             int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {  // the tail through an 8-element buffer, so it rounds the same way
    alignas(16) at::Half h[8] = {};
    alignas(32) float f[8];
    std::memcpy(h, src + i, (n - i) * sizeof(at::Half));
    _mm256_store_ps(f, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h))));
    std::memcpy(dst + i, f, (n - i) * sizeof(float));
  }
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, at::Half* dst,
                                                             int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  if (i < n) {
    alignas(32) float f[8] = {};
    alignas(16) at::Half h[8];
    std::memcpy(f, src + i, (n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(h),
                    _mm256_cvtps_ph(_mm256_load_ps(f), _MM_FROUND_TO_NEAREST_INT));
    std::memcpy(dst + i, h, (n - i) * sizeof(at::Half));
  }
}

bool cpu_has_f16c() {
  __builtin_cpu_init();  // this runs from a static initializer
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
const bool kHasF16C = cpu_has_f16c();
#endif

// dst[i] = acc(src[i]) and dst[i] = round(src[i]) for n elements.
template <typename T>
inline void convert_to_acc(const T* src, acc_t<T>* dst, int64_t n) {
#ifdef MOD_EXT_F16C
  if constexpr (std::is_same_v<T, at::Half>) {
    if (kHasF16C) return half_to_float_f16c(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t<T>>(src[i]);
}

template <typename T>
inline void convert_from_acc(const acc_t<T>* src, T* dst, int64_t n) {
#ifdef MOD_EXT_F16C
  if constexpr (std::is_same_v<T, at::Half>) {
    if (kHasF16C) return float_to_half_f16c(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
constexpr bool kStoredAsAcc = std::is_same_v<T, acc_t<T>>;

// n values of a row in acc precision: the row itself, or converted into `buf`.
template <typename T>
inline const acc_t<T>* load_acc(const T* src, acc_t<T>* buf, int64_t n) {
  if constexpr (kStoredAsAcc<T>) {
    return src;
  } else {
    convert_to_acc(src, buf, n);
    return buf;
  }
}

// n values src[0], src[stride], ... in acc precision: the row itself when it is dense
// and stored as acc, else gathered (and converted) into `buf`. Lets the backward kernels
// read an incoming gradient with its own strides (the stride-0 gradient of .sum(), a
// transposed one) instead of copying it into a contiguous tensor first.
template <typename T>
inline const acc_t<T>* load_acc_strided(const T* src, int64_t stride, acc_t<T>* buf, int64_t n) {
  if (stride == 1) return load_acc(src, buf, n);
  if (stride == 0) {
    std::fill(buf, buf + n, static_cast<acc_t<T>>(*src));
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t<T>>(src[i * stride]);
  }
  return buf;
}

// The element strides of a (B, R, D) tensor, read by the backward kernels in place.
struct RowStrides {
  int64_t b, r, d;
  explicit RowStrides(const at::Tensor& t) : b(t.stride(0)), r(t.stride(1)), d(t.stride(2)) {}
  int64_t row(int64_t bi, int64_t ri) const { return bi * b + ri * r; }
};

// Where to compute n results for `dst`: dst itself when it is stored as acc and not
// streamed, else `buf`; then store_acc moves them to dst (converted, or streamed).
template <typename T>
inline acc_t<T>* acc_target(T* dst, acc_t<T>* buf, bool stream = false) {
  if constexpr (kStoredAsAcc<T>) {
    return stream ? buf : dst;
  } else {
    return buf;
  }
}

template <typename T>
inline void store_acc(const acc_t<T>* results, T* dst, int64_t n, bool stream = false) {
  if constexpr (kStoredAsAcc<T>) {
    if (stream) copy_bytes(dst, results, n * sizeof(T), true);
  } else if (!stream) {
    convert_from_acc(results, dst, n);
  } else {
    T converted[kChunk];
    convert_from_acc(results, converted, n);
    copy_bytes(dst, converted, n * sizeof(T), true);
  }
}

// Tells the compiler that the memory behind `p` is read and may have changed, so values
// stored there must really be stored and reloaded.
inline void memory_barrier(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  asm volatile("" : : "r"(p) : "memory");
#else
  (void)p;
#endif
}

// ---------------------------------------------------------------------------
// Row kernels: one row of D elements, acc math, one rounding per element.
// ---------------------------------------------------------------------------

// dst = round(base + src) in acc precision, base = +0 (kOnZero: the first gradient row
// landing on a position, exactly as the reference's zeros().scatter_add_() computes it,
// so -0.0 becomes +0.0) or the current dst (accumulate a repeated position).
// `src` is read with element stride `src_stride` (1: a dense row).
// With `stream` (kOnZero only) dst is written with non-temporal stores.
template <bool kOnZero, typename scalar_t>
void add_row(const scalar_t* src, int64_t src_stride, scalar_t* dst, int64_t D,
             bool stream = false) {
  using acc = acc_t<scalar_t>;
  acc sbuf[kChunk], dbuf[kChunk];
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    const int64_t n = std::min(kChunk, D - d0);
    const acc* s = load_acc_strided(src + d0 * src_stride, src_stride, sbuf, n);
    acc* o = acc_target(dst + d0, dbuf, kOnZero && stream);
    if constexpr (kOnZero) {
      for (int64_t d = 0; d < n; ++d) o[d] = acc(0) + s[d];
    } else {
      const acc* old = load_acc(dst + d0, dbuf, n);
      for (int64_t d = 0; d < n; ++d) o[d] = old[d] + s[d];
    }
    store_acc(o, dst + d0, n, kOnZero && stream);
  }
}

// dst = round(x + round_acc(w * y)); dst may be x (in place). The product is rounded
// to acc on its own, exactly like the reference (a product tensor, then scatter_add)
// and the CUDA kernel (__fmul_rn then __fadd_rn); fused into an FMA it would round
// differently. GCC's default -ffp-contract=fast fuses `x + w * y` (even across
// statements) wherever the target has FMA (aarch64, x86 with -march=native), so each
// chunk of products goes through memory behind a compiler barrier, then is added.
template <typename scalar_t>
void weighted_add_row(const scalar_t* x, const scalar_t* y, acc_t<scalar_t> w, scalar_t* dst,
                      int64_t D, bool stream) {
  using acc = acc_t<scalar_t>;
  acc prod[kChunk], xbuf[kChunk], ybuf[kChunk];
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    const int64_t n = std::min(kChunk, D - d0);
    const acc* yv = load_acc(y + d0, ybuf, n);
    for (int64_t d = 0; d < n; ++d) prod[d] = w * yv[d];
    memory_barrier(prod);
    const acc* xv = load_acc(x + d0, xbuf, n);
    acc* o = acc_target(dst + d0, xbuf, stream);
    for (int64_t d = 0; d < n; ++d) o[d] = xv[d] + prod[d];
    store_acc(o, dst + d0, n, stream);
  }
}

// grad_y = round(w * g) and returns <g, y> in acc precision. The dot product keeps
// kLanes independent partial sums so it vectorizes (its order differs from a serial
// sum; the weight gradient is compared with a tolerance).
// `g` is read with element stride `g_stride` (1: a dense row).
template <typename scalar_t>
acc_t<scalar_t> scale_and_dot_row(const scalar_t* g, int64_t g_stride, const scalar_t* y,
                                  acc_t<scalar_t> w, scalar_t* grad_y, int64_t D) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kLanes = 16;
  acc gbuf[kChunk], ybuf[kChunk], obuf[kChunk];
  acc part[kLanes] = {};
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    const int64_t n = std::min(kChunk, D - d0);
    const acc* gv = load_acc_strided(g + d0 * g_stride, g_stride, gbuf, n);
    const acc* yv = load_acc(y + d0, ybuf, n);
    acc* o = acc_target(grad_y + d0, obuf);
    for (int64_t d = 0; d < n; ++d) o[d] = w * gv[d];
    store_acc(o, grad_y + d0, n);
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) part[l] += gv[d + l] * yv[d + l];
    }
    for (; d < n; ++d) part[d % kLanes] += gv[d] * yv[d];
  }
  acc sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}


// ---------------------------------------------------------------------------
// gather_tokens: out[b, j] = x[b, indices[b, j]], one contiguous row copy per slot.
// ---------------------------------------------------------------------------
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& indices) {
  check_gather_args(x, indices);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), C = indices.size(1);
  auto out = at::empty({B, C, D}, x.options());
  const auto idx = indices.contiguous();
  check_index_range("gather_tokens", idx, S);
  if (out.numel() == 0) return out;
  const auto xc = x.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(D) * x.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * C, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / C;
      std::memcpy(dst + i * row_bytes, src + (b * S + ip[i]) * row_bytes, row_bytes);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// gather_tokens_backward: grad_x = 0; grad_x[b, indices[b, j]] += grad_output[b, j].
// One pass over the (B, S) rows of grad_x, in blocks of ~64 KB: zero the block with one
// memset (fast string stores, no read of the old contents), then overwrite its routed
// rows, still in cache, with 0 + their first slot's gradient. Rows that repeat a
// position then add the later slots' gradients in slot order (as the reference's
// scatter_add does).
// ---------------------------------------------------------------------------
at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                      int64_t seq_len) {
  check_gather_backward_args(grad_output, indices, seq_len);
  const int64_t B = grad_output.size(0), C = grad_output.size(1), D = grad_output.size(2);
  const int64_t S = seq_len;
  const auto idx = indices.contiguous();
  check_index_range("gather_tokens_backward", idx, S);
  if (grad_output.numel() == 0) return at::zeros({B, S, D}, grad_output.options());
  auto grad_x = at::empty({B, S, D}, grad_output.options());
  std::vector<uint8_t> has_repeats;
  const auto slot = build_slot_map("gather_tokens_backward", idx, S, /*unique=*/false, &has_repeats);
  const bool any_repeats = std::find(has_repeats.begin(), has_repeats.end(), 1) != has_repeats.end();
  // grad_output is read with its own strides (no contiguous copy): .sum().backward()
  // hands a stride-0 expanded gradient, other callers transposed or sliced ones.
  const RowStrides gs(grad_output);
  const int64_t* ip = idx.data_ptr<int64_t>();
  MOD_EXT_DISPATCH_DATA_TYPES(grad_output.scalar_type(), "gather_tokens_backward_cpu", [&] {
    const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
    scalar_t* op = grad_x.data_ptr<scalar_t>();
    // Every row of grad_x: zeros, or 0 + its first slot's gradient.
    if (grad_x.nbytes() >= kStreamBytes) {
      // A large grad_x is written once, row by row, with non-temporal stores: runs of
      // zero rows, and 0 + the first slot's gradient for a routed row.
      at::parallel_for(0, B * S, row_grain(D * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end;) {
          const int64_t j = slot[r];
          if (j < 0) {
            const int64_t e = unrouted_run_end(slot.data(), r, end);
            zero_bytes(op + r * D, (e - r) * D * sizeof(scalar_t), /*stream=*/true);
            r = e;
          } else {
            add_row</*kOnZero=*/true>(gp + gs.row(r / S, j), gs.d, op + r * D, D, /*stream=*/true);
            ++r;
          }
        }
        stream_fence();
      });
    } else {
      at::parallel_for(0, B * S, row_grain(D * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
        const int64_t block = std::max<int64_t>(1, 65536 / (D * sizeof(scalar_t)));
        for (int64_t r0 = begin; r0 < end; r0 += block) {
          const int64_t r1 = std::min(end, r0 + block);
          std::memset(op + r0 * D, 0, (r1 - r0) * D * sizeof(scalar_t));
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t j = slot[r];
            if (j >= 0) add_row</*kOnZero=*/true>(gp + gs.row(r / S, j), gs.d, op + r * D, D);
          }
        }
      });
    }
    // Rows with repeated positions: add the later slots, in slot order.
    if (any_repeats) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!has_repeats[b]) continue;
          for (int64_t j = 0; j < C; ++j) {
            const int64_t s = ip[b * C + j];
            if (slot[b * S + s] != j) {
              add_row</*kOnZero=*/false>(gp + gs.row(b, j), gs.d, op + (b * S + s) * D, D);
            }
          }
        }
      });
    }
  });
  return grad_x;
}

// ---------------------------------------------------------------------------
// scatter_add_weighted: out = x; out[b, idx] = round(x[b, idx] + w[b, j] * y[b, j]).
// One pass over the (B, S) rows of out, via the slot map, writes every row once:
// x + w * y for a routed row, a copy of x for each run of the others. An output of
// kStreamBytes or more is written with non-temporal stores.
// ---------------------------------------------------------------------------
at::Tensor scatter_add_weighted_cpu(const at::Tensor& x, const at::Tensor& y,
                                    const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted", x, "x", y, indices, weights);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), C = indices.size(1);
  const auto idx = indices.contiguous();
  check_index_range("scatter_add_weighted", idx, S);
  const auto slot = build_slot_map("scatter_add_weighted", idx, S, /*unique=*/true);
  const auto xc = x.contiguous();
  auto out = at::empty({B, S, D}, x.options());
  if (out.numel() == 0) return out;
  const auto yc = y.contiguous();
  const bool is_double = x.scalar_type() == at::kDouble;
  const auto w = weights.to(is_double ? at::kDouble : at::kFloat).contiguous();
  MOD_EXT_DISPATCH_DATA_TYPES(x.scalar_type(), "scatter_add_weighted_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    const acc* wp = w.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Unrouted rows are bit-identical copies of x (NaN payloads included).
    const bool stream = out.nbytes() >= kStreamBytes;
    at::parallel_for(0, B * S, row_grain(D * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {
        const int64_t j = slot[r];
        if (j < 0) {  // a run of unrouted rows: one copy
          const int64_t e = unrouted_run_end(slot.data(), r, end);
          copy_bytes(op + r * D, xp + r * D, (e - r) * D * sizeof(scalar_t), stream);
          r = e;
        } else {
          const int64_t i = (r / S) * C + j;
          weighted_add_row(xp + r * D, yp + i * D, wp[i], op + r * D, D, stream);
          ++r;
        }
      }
      stream_fence();
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// scatter_add_weighted_: the in-place variant for inference: only the routed rows of
// x are read and written (no copy of x).
// ---------------------------------------------------------------------------

// out[b, idx] = round(out[b, idx] + w[b, j] * y[b, j]) for every slot; `out` is
// contiguous (B, S, D). Indices are already range- and uniqueness-checked, so the
// slots of a row write disjoint rows.
void scatter_rows_cpu_(at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                       const at::Tensor& weights) {
  const int64_t B = out.size(0), S = out.size(1), D = out.size(2), C = idx.size(1);
  if (B == 0 || C == 0 || D == 0) return;
  const auto yc = y.contiguous();
  const bool is_double = out.scalar_type() == at::kDouble;
  const auto w = weights.to(is_double ? at::kDouble : at::kFloat).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  MOD_EXT_DISPATCH_DATA_TYPES(out.scalar_type(), "scatter_add_weighted_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    const acc* wp = w.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, row_grain(D * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = op + ((i / C) * S + ip[i]) * D;
        weighted_add_row(row, yp + i * D, wp[i], row, D, /*stream=*/false);
      }
    });
  });
}


void scatter_add_weighted__cpu(at::Tensor& x, const at::Tensor& y,
                                 const at::Tensor& indices, const at::Tensor& weights) {
  check_scatter_args("scatter_add_weighted_", x, "x", y, indices, weights);
  check_inplace_args(x, y, weights);
  const auto idx = indices.contiguous();
  check_index_range("scatter_add_weighted_", idx, x.size(1));
  build_slot_map("scatter_add_weighted_", idx, x.size(1), /*unique=*/true);  // the check only
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
    // Only the C routed rows of grad_output are read, with its own strides: the
    // stride-0 gradient of .sum() or a transposed one is not copied.
    const RowStrides gs(grad_output);
    const auto yc = y.contiguous();
    const auto w = weights.to(acc_type).contiguous();
    const int64_t* ip = idx.data_ptr<int64_t>();
    MOD_EXT_DISPATCH_DATA_TYPES(y.scalar_type(), "scatter_add_weighted_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
      const scalar_t* yp = yc.data_ptr<scalar_t>();
      const acc* wp = w.data_ptr<acc>();
      scalar_t* gyp = grad_y.data_ptr<scalar_t>();
      acc* gwp = grad_w_acc.data_ptr<acc>();
      at::parallel_for(0, B * C, row_grain(D * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* grow = gp + gs.row(i / C, ip[i]);
          gwp[i] = scale_and_dot_row(grow, gs.d, yp + i * D, wp[i], gyp + i * D, D);
        }
      });
    });
  } else if (B > 0 && C > 0) {
    grad_y.zero_();
  }
  return {grad_y, grad_w_acc.to(weights.scalar_type())};
}


}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cpu);
  m.impl("scatter_add_weighted", &scatter_add_weighted_cpu);
  m.impl("scatter_add_weighted_", &scatter_add_weighted__cpu);
  m.impl("scatter_add_weighted_backward", &scatter_add_weighted_backward_cpu);
}
MOD_EXT_REGISTER_FAMILY(rows, cpu);

}  // namespace mod_ext
