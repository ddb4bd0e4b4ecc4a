// The per-chunk kernels of the fused restore + base-optimizer steps (step_ops.cpp), behind a table of
// function pointers with one instruction-set variant per entry of kernels.h's table (portable and AVX2,
// both in step_kernels.cpp, chosen with the same rule as kernels()). Pointers are already offset to
// the chunk; n is its element count.
#pragma once

#include <ATen/ATen.h>

#include <fastperturb/step_math.h>

namespace fastperturb {
namespace cpu {

struct SgdStepArgs {
  void* param;
  const void* backup;  // may equal param (a tensor that was not perturbed)
  const void* grad;
  void* momentum;  // nullptr when momentum == 0
  double lr, weight_decay, momentum_coef, dampening;
  bool nesterov, maximize, init_momentum;
};

struct AdamStepArgs {
  void* param;
  const void* backup;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  double lr, beta1, beta2, eps, step, weight_decay;
  bool decoupled, maximize;
};

struct StepKernelTable {
  const char* isa;
  void (*sgd)(at::ScalarType dtype, const SgdStepArgs& a, int64_t n);
  void (*adam)(at::ScalarType dtype, const AdamStepArgs& a, int64_t n);
};

// The variant kernels() runs (FASTPERTURB_CPU_ISA=default forces the portable one here too).
const StepKernelTable& step_kernels();

}  // namespace cpu
}  // namespace fastperturb
