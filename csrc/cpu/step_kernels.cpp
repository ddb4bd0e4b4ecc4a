// The kernels of the fused restore + base-optimizer steps (step_loops.h), compiled twice: the portable
// variant and, on x86-64, an AVX2 one (no FMA: both round like the reference), and the choice between them.
#include "cpu/step_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "cpu/kernels.h"

#define FP_ISA step_default
#include "cpu/step_loops.h"
#undef FP_ISA

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FP_HAVE_AVX2_STEP 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define FP_ISA step_avx2
#include "cpu/step_loops.h"
#undef FP_ISA
#pragma GCC pop_options
#endif

namespace fastperturb {
namespace cpu {

// The same variant as the other kernels (kernels.cpp's choice, which honours FASTPERTURB_CPU_ISA).
static const StepKernelTable* choose_step() {
#ifdef FP_HAVE_AVX2_STEP
  if (std::strcmp(kernels().isa, "avx2") == 0) return step_avx2::table("avx2");
#endif
  return step_default::table("default");
}

const StepKernelTable& step_kernels() {
  static const StepKernelTable* const t = choose_step();
  return *t;
}

}  // namespace cpu
}  // namespace fastperturb
