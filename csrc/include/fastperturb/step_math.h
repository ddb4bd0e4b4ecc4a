// The per-element arithmetic of the fused restore + base-optimizer steps
// (restore_sgd_step_, restore_adam_step_), written once for the CPU kernels
// (csrc/cpu/step_*.cpp), the CUDA work-list functors
// (fastperturb/worklist/step_ops.h) and, through the same formulas, the
// Triton kernels. fastperturb/ops/reference.py is the spec (it follows
// torch.optim's single-tensor SGD and Adam/AdamW); keep the three in step.
//
// Every element starts from the stored pre-perturbation weight b (the cycle's
// backup), never from the perturbed weight in the parameter: that is the
// restore folded into the update.
#pragma once

#include <cmath>

#include "fastperturb/math.h"

namespace fastperturb {
namespace step_math {

// The per-call coefficients of SGD, converted to the compute type C. The host
// computes them in double from the group's hyperparameters.
template <typename C>
struct SgdCoefs {
  C lr;
  C weight_decay;  // 0: off
  C momentum;
  C one_minus_dampening;
  bool decay;  // weight_decay != 0
  // momentum != 0, decided in double: torch keeps a buffer for any non-zero momentum, also one that rounds to 0 in
  // the compute type (the buffer is then (1 - dampening) g, and g itself on its first step)
  bool has_momentum;
  bool nesterov;
  bool maximize;
  bool init_momentum;  // buf := g (torch's first step: a fresh buffer)
};

// One element of torch.optim.SGD's single-tensor step taken at the backup b.
// Returns the new weight; updates buf (when momentum != 0).
template <typename C>
FP_HD C sgd_element(C b, C g, C& buf, const SgdCoefs<C>& k) {
  if (k.maximize) g = -g;
  if (k.decay) g = g + k.weight_decay * b;
  if (k.has_momentum) {
    buf = k.init_momentum ? g : buf * k.momentum + k.one_minus_dampening * g;
    g = k.nesterov ? g + k.momentum * buf : buf;
  }
  return b + (-k.lr) * g;
}

// The per-call coefficients of Adam/AdamW (one step count per call).
template <typename C>
struct AdamCoefs {
  C weight_decay;  // L2 (Adam): g += wd * w
  C decay_factor;  // decoupled (AdamW): w *= 1 - lr * wd
  C one_minus_beta1;
  C beta2;
  C one_minus_beta2;
  C bias_correction2_sqrt;
  C eps;
  C neg_step_size;  // -lr / (1 - beta1^step)
  bool maximize;
  bool amsgrad;
  bool l2;         // weight_decay != 0, not decoupled
  bool decoupled;  // weight_decay != 0, decoupled
};

// torch's lerp(a, b, w): two formulas split at w = 0.5 (kept, so the rounding matches). Both are
// computed and one is selected: a branch around floating-point operations is not if-converted by GCC
// (they might trap), which would keep the loop from vectorising; the extra flops are free in a
// memory-bound loop.
template <typename C>
FP_HD C lerp(C a, C b, C w) {
  const C low = a + w * (b - a);
  const C high = b - (b - a) * (C(1) - w);
  return w < C(0.5) ? low : high;
}

// math.h's max_nan (NaN from a first, then from b), written as selects for the same reason.
template <typename C>
FP_HD C max_nan_select(C a, C b) {
  const C larger = a > b ? a : b;
  return a != a ? a : (b != b ? b : larger);
}

// One element of torch.optim.Adam's single-tensor step (AdamW: decoupled decay)
// taken at the backup b. Returns the new weight; updates m, v and vmax (amsgrad).
template <typename C>
FP_HD C adam_element(C b, C g, C& m, C& v, C& vmax, const AdamCoefs<C>& k) {
  if (k.maximize) g = -g;
  C w = b;
  if (k.decoupled) w = w * k.decay_factor;
  if (k.l2) g = g + k.weight_decay * w;
  m = lerp(m, g, k.one_minus_beta1);
  v = v * k.beta2 + k.one_minus_beta2 * g * g;  // mul_ then addcmul_, in ATen's order
  C s = v;
  if (k.amsgrad) {
    vmax = max_nan_select(vmax, v);
    s = vmax;
  }
  const C denom = std::sqrt(s) / k.bias_correction2_sqrt + k.eps;
  return w + k.neg_step_size * m / denom;  // addcdiv_, in ATen's order
}

// The coefficients of one call, from the op's arguments (host side, in double, as torch's
// Python scalars are), converted once to C.
template <typename C>
inline SgdCoefs<C> sgd_coefs(double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                             bool maximize, bool init_momentum) {
  return SgdCoefs<C>{static_cast<C>(lr),
                     static_cast<C>(weight_decay),
                     static_cast<C>(momentum),
                     static_cast<C>(1.0 - dampening),
                     weight_decay != 0.0,
                     momentum != 0.0,
                     nesterov,
                     maximize,
                     init_momentum};
}

template <typename C>
inline AdamCoefs<C> adam_coefs(double lr, double beta1, double beta2, double eps, double step, double weight_decay,
                               bool decoupled, bool maximize, bool amsgrad) {
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  return AdamCoefs<C>{static_cast<C>(decoupled ? 0.0 : weight_decay),
                      static_cast<C>(decoupled && weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0),
                      static_cast<C>(1.0 - beta1),
                      static_cast<C>(beta2),
                      static_cast<C>(1.0 - beta2),
                      static_cast<C>(std::sqrt(bias_correction2)),
                      static_cast<C>(eps),
                      static_cast<C>(-(lr / bias_correction1)),
                      maximize,
                      amsgrad,
                      !decoupled && weight_decay != 0.0,
                      decoupled && weight_decay != 0.0};
}

}  // namespace step_math
}  // namespace fastperturb
