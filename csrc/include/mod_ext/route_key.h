// The one routing key of topk_route, shared by the CPU and CUDA kernels.
//
// The routing order of MOD_SPEC sections 1-2 is a strict total order on the tokens of a
// row:  valid numbers (largest first) > valid NaN > invalid tokens, ties to the lower
// position. route_key encodes it as one unsigned 64-bit key, larger is better, unique per
// token because the low bits hold the inverted position:
//   bits 63..62  class: 2 = valid number, 1 = valid NaN, 0 = invalid
//   bits 61..30  order-preserving encoding of the float32 value (0 unless class 2):
//                -0.0 is folded onto +0.0; negative -> ~bits, positive -> bits | sign bit
//   bits 29..0   (2^30 - 1 - position)
// Sequences are therefore limited to 2^30 tokens (kMaxSeqLen; checks.h enforces it).
//
// Written without branches so the loops that build a row's keys have no data-dependent
// jumps. It replaced a branchy twin (class by if/else) that it matched bit for bit on all
// 2^32 float bit patterns x valid x positions {0, 1, 12345, 2^30 - 1}.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOD_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOD_EXT_HOST_DEVICE inline
#endif

namespace mod_ext {

constexpr int64_t kMaxSeqLen = int64_t(1) << 30;

MOD_EXT_HOST_DEVICE uint64_t route_key(float value, bool valid, int64_t position) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(value);
#else
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint64_t is_nan = magnitude > 0x7f800000u;
  bits = magnitude == 0u ? 0u : bits;  // -0.0 ties with +0.0
  // negative -> ~bits, positive -> bits | sign bit
  const uint32_t order =
      bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
  const uint64_t cls = valid ? 2u - is_nan : 0u;
  const uint64_t vkey = cls == 2u ? order : 0u;
  return (cls << 62) | (vkey << 30) | static_cast<uint64_t>((kMaxSeqLen - 1) - position);
}

// Whether the token behind a key is valid: the class bits are 0 exactly for invalid tokens.
MOD_EXT_HOST_DEVICE bool route_key_is_valid(uint64_t key) { return (key >> 62) != 0; }

}  // namespace mod_ext
