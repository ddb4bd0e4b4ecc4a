// The element loops of the fused restore + base-optimizer steps, one chunk at a time. The arithmetic
// is fastperturb/step_math.h's; this file only loads, converts, loops and stores. The hyperparameter
// branches that change the memory traffic (momentum, its first step, amsgrad) are template
// parameters, so each loop is straight-line and vectorises.
//
// No include guard on purpose (like loops.h): step_kernels.cpp includes it once per instruction-set
// variant with FP_ISA naming that variant's namespace, the AVX2 one inside a `#pragma GCC target` region;
// it must not include anything itself.
#ifndef FP_ISA
#error "define FP_ISA before including step_loops.h"
#endif

namespace fastperturb {
namespace cpu {
namespace FP_ISA {
template <typename T, bool Momentum, bool Init>
void sgd_t(const SgdStepArgs& a, int64_t n) {
  using C = math::compute_t<T>;
  T* w = static_cast<T*>(a.param);
  const T* b = static_cast<const T*>(a.backup);
  const T* g = static_cast<const T*>(a.grad);
  T* buf = static_cast<T*>(a.momentum);
  const auto k = step_math::sgd_coefs<C>(a.lr, a.weight_decay, Momentum ? a.momentum_coef : 0.0, a.dampening,
                                         a.nesterov, a.maximize, Init);
  for (int64_t i = 0; i < n; ++i) {
    C bi = Momentum && !Init ? static_cast<C>(buf[i]) : C(0);
    const C nw = step_math::sgd_element(static_cast<C>(b[i]), static_cast<C>(g[i]), bi, k);
    if constexpr (Momentum) buf[i] = static_cast<T>(bi);
    w[i] = static_cast<T>(nw);
  }
}
template <typename T>
void sgd_dispatch(const SgdStepArgs& a, int64_t n) {
  if (a.momentum == nullptr) return sgd_t<T, false, false>(a, n);
  return a.init_momentum ? sgd_t<T, true, true>(a, n) : sgd_t<T, true, false>(a, n);
}
template <typename T, bool Amsgrad>
void adam_t(const AdamStepArgs& a, int64_t n) {
  using C = math::compute_t<T>;
  T* w = static_cast<T*>(a.param);
  const T* b = static_cast<const T*>(a.backup);
  const T* g = static_cast<const T*>(a.grad);
  T* m = static_cast<T*>(a.exp_avg);
  T* v = static_cast<T*>(a.exp_avg_sq);
  T* vmax = static_cast<T*>(a.max_exp_avg_sq);
  const auto k =
      step_math::adam_coefs<C>(a.lr, a.beta1, a.beta2, a.eps, a.step, a.weight_decay, a.decoupled, a.maximize, Amsgrad);
  for (int64_t i = 0; i < n; ++i) {
    C mi = static_cast<C>(m[i]);
    C vi = static_cast<C>(v[i]);
    C xi = Amsgrad ? static_cast<C>(vmax[i]) : C(0);
    const C nw = step_math::adam_element(static_cast<C>(b[i]), static_cast<C>(g[i]), mi, vi, xi, k);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    if constexpr (Amsgrad) vmax[i] = static_cast<T>(xi);
    w[i] = static_cast<T>(nw);
  }
}
template <typename T>
void adam_dispatch(const AdamStepArgs& a, int64_t n) {
  return a.max_exp_avg_sq != nullptr ? adam_t<T, true>(a, n) : adam_t<T, false>(a, n);
}
inline void sgd_entry(at::ScalarType dtype, const SgdStepArgs& a, int64_t n) {
  switch (dtype) {
    case at::kFloat: return sgd_dispatch<float>(a, n);
    case at::kDouble: return sgd_dispatch<double>(a, n);
    case at::kHalf: return sgd_dispatch<c10::Half>(a, n);
    case at::kBFloat16: return sgd_dispatch<c10::BFloat16>(a, n);
    default: TORCH_CHECK(false, "fastperturb: unsupported dtype ", dtype);
  }
}
inline void adam_entry(at::ScalarType dtype, const AdamStepArgs& a, int64_t n) {
  switch (dtype) {
    case at::kFloat: return adam_dispatch<float>(a, n);
    case at::kDouble: return adam_dispatch<double>(a, n);
    case at::kHalf: return adam_dispatch<c10::Half>(a, n);
    case at::kBFloat16: return adam_dispatch<c10::BFloat16>(a, n);
    default: TORCH_CHECK(false, "fastperturb: unsupported dtype ", dtype);
  }
}
inline const StepKernelTable* table(const char* isa) {
  static const StepKernelTable t{isa, &sgd_entry, &adam_entry};
  return &t;
}
}  // namespace FP_ISA

}  // namespace cpu
}  // namespace fastperturb
