// The portable variant of the CPU kernels (the compiler's baseline instruction set).
#include "kernels.h"

#define FP_ISA isa_default
#include "loops.h"
#undef FP_ISA

namespace fastperturb {
namespace cpu {

const KernelTable* kernels_default() { return isa_default::table("default"); }

}  // namespace cpu
}  // namespace fastperturb
