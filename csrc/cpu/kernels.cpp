// Picks the kernel variant once, from what the CPU supports.
#include "kernels.h"

#include <cstdlib>
#include <cstring>

namespace fastperturb {
namespace cpu {

static const KernelTable* choose() {
  const char* force = std::getenv("FASTPERTURB_CPU_ISA");
  const bool portable = force != nullptr && std::strcmp(force, "default") == 0;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  if (!portable && kernels_avx2() != nullptr && __builtin_cpu_supports("avx2")) return kernels_avx2();
#endif
  (void)portable;
  return kernels_default();
}

const KernelTable& kernels() {
  static const KernelTable* const t = choose();
  return *t;
}

}  // namespace cpu
}  // namespace fastperturb
