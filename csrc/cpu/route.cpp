// CPU kernels of the routing family: topk_route and threshold_route. Schemas:
// registration.cpp. Semantics: mod_ext/reference.py (the oracles the tests compare with).
// Both are parallel over rows (at::parallel_for) and work on contiguous copies.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <vector>

#include "mod_ext/build_registry.h"
#include "mod_ext/checks.h"
#include "mod_ext/route_key.h"

namespace mod_ext {
namespace {

// just below the highest bit in which the remaining candidates still differ, so a row of
// equal logits (keys that differ only in their position bits) takes one or two passes,
// not six.
constexpr int kDigitBits = 11;
constexpr uint32_t kBuckets = 1u << kDigitBits;
constexpr int64_t kSmallSelect = 96;  // below this, nth_element beats another pass

// The bits in which a set of keys differ: OR ^ AND over the set.
struct VaryingBits {
  uint64_t any = 0, all = ~uint64_t(0);
  void add(uint64_t key) { any |= key, all &= key; }
  void add_if(uint64_t key, bool cond) {  // without a branch
    const uint64_t mask = uint64_t(0) - cond;
    any |= key & mask, all &= key | ~mask;
  }
  uint64_t bits() const { return any ^ all; }
};

inline int highest_bit(uint64_t v) {  // v != 0
  int b = 63;
  while (!(v >> b)) --b;
  return b;
}

// The bucket that holds the k-th largest key (k is 1-based) given a histogram of one
// digit; on return k is the rank within that bucket.
inline uint32_t bucket_of_kth(const uint32_t* hist, int64_t& k) {
  uint32_t t = kBuckets - 1;
  while (hist[t] < k) k -= hist[t--];
  return t;
}

// The k-th largest (1 <= k <= n) of n unique keys, whose differing bits are `varying`.
// Each pass histograms one digit of the remaining candidates and keeps only the bucket
// holding the k-th (a few hundred candidates at most after the first pass on realistic
// logits). `a` and `b` are scratch space for n keys each.
uint64_t kth_largest_key(const uint64_t* keys, int64_t n, int64_t k, uint64_t varying,
                         uint64_t* a, uint64_t* b) {
  const uint64_t* cand = keys;
  uint32_t hist[kBuckets];
  while (n > kSmallSelect) {  // n > 1, so the unique keys differ somewhere: varying != 0
    const int shift = std::max(highest_bit(varying) + 1 - kDigitBits, 0);
    std::fill(hist, hist + kBuckets, 0u);
    for (int64_t i = 0; i < n; ++i) ++hist[(cand[i] >> shift) & (kBuckets - 1)];
    const uint32_t t = bucket_of_kth(hist, k);
    // Keep the candidates of bucket t: write every key, advance only past the kept ones.
    VaryingBits kept;
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t key = cand[i];
      const bool keep = ((key >> shift) & (kBuckets - 1)) == t;
      a[m] = key;
      m += keep;
      kept.add_if(key, keep);
    }
    cand = a;
    std::swap(a, b);
    n = m;
    varying = kept.bits();
  }
  if (cand == keys) cand = std::copy(keys, keys + n, a) - n;  // nth_element reorders
  uint64_t* c = const_cast<uint64_t*>(cand);
  std::nth_element(c, c + (k - 1), c + n, std::greater<uint64_t>());
  return c[k - 1];
}

// One row of topk_route: writes the `capacity` selected positions in ascending order.
template <typename scalar_t>
void topk_route_row(const scalar_t* logits, const bool* valid, int64_t S, int64_t capacity,
                    uint64_t* keys, uint64_t* scratch_a, uint64_t* scratch_b, int64_t* out_idx,
                    bool* out_mask) {
  VaryingBits varying;
  for (int64_t s = 0; s < S; ++s) {
    keys[s] = route_key(static_cast<float>(logits[s]), valid ? valid[s] : true, s);
    varying.add(keys[s]);
  }
  // Keys are unique, so exactly `capacity` keys are >= the capacity-th largest.
  const uint64_t threshold =
      kth_largest_key(keys, S, capacity, varying.bits(), scratch_a, scratch_b);
  // Emit positions in order: write every position, advance only past the selected ones.
  int64_t j = 0;
  for (int64_t s = 0; s < S && j < capacity; ++s) {
    out_idx[j] = s;
    j += keys[s] >= threshold;
  }
  TORCH_INTERNAL_ASSERT(j == capacity, "topk_route_cpu: selected ", j, " != ", capacity);
  if (valid) {
    for (int64_t i = 0; i < capacity; ++i) out_mask[i] = valid[out_idx[i]];
  } else {
    std::fill(out_mask, out_mask + capacity, true);
  }
}


// ---------------------------------------------------------------------------
// topk_route: expert-choice top-k per row. Builds the unique 64-bit route_key
// of every token, finds the capacity-th largest by radix select (O(S)), then
// emits the positions of the keys >= it in ascending order. One row per task.
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> topk_route_cpu(const at::Tensor& router_logits,
                                                  int64_t capacity,
                                                  const std::optional<at::Tensor>& valid) {
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

  MOD_EXT_DISPATCH_ROUTE_TYPES(logits.scalar_type(), "topk_route_cpu", [&] {
    const scalar_t* src = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> buf(3 * S);  // keys + two scratch arrays
      for (int64_t b = begin; b < end; ++b) {
        topk_route_row(src + b * S, valid_ptr ? valid_ptr + b * S : nullptr, S, capacity,
                       buf.data(), buf.data() + S, buf.data() + 2 * S,
                       idx_ptr + b * capacity, mask_ptr + b * capacity);
      }
    });
  });
  return {indices, slot_mask};
}

// ---------------------------------------------------------------------------
// threshold_route: causal first-come-first-served routing (MOD_SPEC section 3).
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> threshold_route_cpu(const at::Tensor& scores, int64_t capacity,
                                                       const std::optional<at::Tensor>& valid) {
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

  MOD_EXT_DISPATCH_ROUTE_TYPES(sc.scalar_type(), "threshold_route_cpu", [&] {
    const scalar_t* src = sc.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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

}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, CPU, m) {
  m.impl("topk_route", &topk_route_cpu);
  m.impl("threshold_route", &threshold_route_cpu);
}
MOD_EXT_REGISTER_FAMILY(route, cpu);

}  // namespace mod_ext
