// Facts about the CUDA part of the build that only nvcc knows (see build_registry.h).
#include <cuda_runtime_api.h>

#include <string>

#include "mod_ext/build_registry.h"

namespace mod_ext {

std::string cuda_archs_compiled() {
#if defined(__CUDA_ARCH_LIST__)
#define MOD_EXT_STR_(...) #__VA_ARGS__
#define MOD_EXT_STR(...) MOD_EXT_STR_(__VA_ARGS__)
  return MOD_EXT_STR(__CUDA_ARCH_LIST__);  // e.g. "800,900": one entry per -gencode arch
#else
  return "";  // nvcc older than 11.5 does not say
#endif
}

int cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace mod_ext
