// Which kernel families this library was built with, recorded by the family sources
// themselves: each csrc/<backend>/<family>.* file that is compiled and linked registers
// ("family", "backend") from a static initializer, so build_info() reports what is really
// in the library, not what the build meant to put there.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace mod_ext {

using FamilyList = std::vector<std::pair<std::string, std::string>>;

// The registered (family, backend) pairs; filled while the library loads.
FamilyList& built_families();

struct FamilyRegistrar {
  FamilyRegistrar(const char* family, const char* backend) {
    built_families().emplace_back(family, backend);
  }
};

#define MOD_EXT_CONCAT_(a, b) a##b
#define MOD_EXT_CONCAT(a, b) MOD_EXT_CONCAT_(a, b)
// MOD_EXT_REGISTER_FAMILY(route, cpu) next to the TORCH_LIBRARY_IMPL of a family.
#define MOD_EXT_REGISTER_FAMILY(family, backend)                                   \
  static const ::mod_ext::FamilyRegistrar MOD_EXT_CONCAT(mod_ext_family_, __LINE__)( \
      #family, #backend)

#if defined(MOD_EXT_WITH_CUDA)
// Defined in csrc/cuda/build_info.cu (compiled by nvcc, which knows these).
std::string cuda_archs_compiled();  // __CUDA_ARCH_LIST__, e.g. "800,900"
int cuda_runtime_version_built();   // CUDART_VERSION, e.g. 13000
#endif

}  // namespace mod_ext
