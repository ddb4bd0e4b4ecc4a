// The work-list functors of the fused restore + base-optimizer steps (restore_sgd_step_,
// restore_adam_step_), run by the CUDA kernels (csrc/cuda/step_kernels.cu) and by the CPU executor of
// the test build, through worklist::run_block (device.h). Element-wise, no reduction; the arithmetic
// is fastperturb/step_math.h's.
#pragma once

#include "fastperturb/step_math.h"
#include "fastperturb/worklist/device.h"

namespace fastperturb {
namespace worklist {

// Lists (params, backups, grads, momentum_buffers); momentum_buffers absent when momentum == 0.
template <typename T>
struct SgdStepOp {
  static constexpr int kDepth = 4;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = None;
  using PerTensor = None;
  step_math::SgdCoefs<C> k;

  FP_HD bool reads(int d) const { return d == 1 || d == 2 || (d == 3 && k.has_momentum && !k.init_momentum); }
  FP_HD bool writes(int d) const { return d == 0 || (d == 3 && k.has_momentum); }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[4], Acc&, const PerTensor&) const {
    C buf = static_cast<C>(x[3]);
    const C nw = step_math::sgd_element(static_cast<C>(x[1]), static_cast<C>(x[2]), buf, k);
    x[3] = static_cast<T>(buf);
    x[0] = static_cast<T>(nw);
  }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// Lists (params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs); the last absent unless amsgrad.
template <typename T>
struct AdamStepOp {
  static constexpr int kDepth = 6;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = None;
  using PerTensor = None;
  step_math::AdamCoefs<C> k;

  FP_HD bool reads(int d) const { return (d >= 1 && d <= 4) || (d == 5 && k.amsgrad); }
  FP_HD bool writes(int d) const { return d == 0 || d == 3 || d == 4 || (d == 5 && k.amsgrad); }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[6], Acc&, const PerTensor&) const {
    C m = static_cast<C>(x[3]);
    C v = static_cast<C>(x[4]);
    C vmax = static_cast<C>(x[5]);
    const C nw = step_math::adam_element(static_cast<C>(x[1]), static_cast<C>(x[2]), m, v, vmax, k);
    x[3] = static_cast<T>(m);
    x[4] = static_cast<T>(v);
    x[5] = static_cast<T>(vmax);
    x[0] = static_cast<T>(nw);
  }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

}  // namespace worklist
}  // namespace fastperturb
