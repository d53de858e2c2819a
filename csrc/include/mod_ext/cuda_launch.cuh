// Launch helpers shared by the CUDA kernel families (csrc/cuda/*.cu).
//
// Common rules of every CUDA kernel of mod_ext:
//   * Inputs are made contiguous on the host; outputs are contiguous.
//   * No host synchronisation anywhere (the ops run under CUDA-graph capture): no
//     cudaDeviceSynchronize, no reads of device data on the host, no data-dependent
//     allocation. The only host-side CUDA calls besides launches are the one-time
//     cudaFuncGetAttributes / cudaFuncSetAttribute of topk_route (cached per device).
//   * Math is done in float32 (float64 for float64 data) and rounded once to the output dtype.
//   * All kernels use grid-stride loops over their work items, so any B, C fits the grid.
#pragma once

#include <algorithm>
#include <cstdint>

namespace mod_ext {
namespace cuda {

constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // grid-stride loops cover the rest
constexpr unsigned kFullMask = 0xffffffffu;

inline unsigned blocks_for(int64_t n_items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(n_items, kMaxBlocks)));
}

}  // namespace cuda
}  // namespace mod_ext
