// The AVX2 variant of the CPU kernels (x86-64 with GCC or Clang), chosen at
// run time by kernels.cpp when the CPU has AVX2, so a wheel built for the
// x86-64 baseline still uses 256-bit vectors where it can.
//
// Every header is included before the target pragma: only the loops of
// loops.h are compiled for AVX2, never an inline function the linker could
// share with code that runs on CPUs without it. No FMA: the variants must
// round exactly like the portable one (and like the reference).
#include "kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FP_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define FP_ISA isa_avx2
#include "loops.h"
#undef FP_ISA
#pragma GCC pop_options
#endif

namespace fastperturb {
namespace cpu {

const KernelTable* kernels_avx2() {
#ifdef FP_HAVE_AVX2_VARIANT
  return isa_avx2::table("avx2");
#else
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace fastperturb
