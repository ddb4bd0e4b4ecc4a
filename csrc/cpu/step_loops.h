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

// Vectorisation: every pointer is __restrict__ (the lists are distinct tensors), except that the
// backup may be the parameter itself (a tensor that was not perturbed): then InPlace reads it through
// the parameter's pointer, so the compiler sees one array. The hyperparameter switches are template
// parameters (set into the coefficients as constants), which leaves straight-line loop bodies.
//
// Where the weights are read from the backup, they are write-only here: a chunk of kStreamMinBytes or more
// computes them a block at a time into a buffer on the stack and streams the block out (stream_stores.h),
// which saves the read for ownership of every weight line (7 passes of memory traffic for Adam, not 8).

// Calls body(stream, begin, count, buf) over [0, n): once over all of it with stream false (the body writes
// w itself), or block by block with stream true, the body writing the block's new weights to buf[0..count),
// which is then streamed to w + begin.
template <typename T, typename Body>
inline void over_blocks(T* __restrict__ w, int64_t n, bool stream, const Body& body) {
  if (!stream) {
    body(std::false_type{}, int64_t(0), n, w);
    return;
  }
  constexpr int64_t kSub = kStreamBlockBytes / sizeof(T);
  T buf[kSub];
  for (int64_t s = 0; s < n; s += kSub) {
    const int64_t m = std::min(kSub, n - s);
    body(std::true_type{}, s, m, buf);
    stream_copy(w + s, buf, m * static_cast<int64_t>(sizeof(T)));
  }
  stream_fence();
}

template <bool InPlace, typename T>
inline bool streams(int64_t n) {
  return !InPlace && n * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
}
template <typename T, bool InPlace, bool Momentum, bool Init, bool Nesterov, bool Maximize, bool Decay>
void sgd_t(const SgdStepArgs& a, int64_t n) {
  using C = math::compute_t<T>;
  T* __restrict__ w = static_cast<T*>(a.param);
  const T* __restrict__ b = static_cast<const T*>(a.backup);
  const T* __restrict__ g = static_cast<const T*>(a.grad);
  T* __restrict__ buf = static_cast<T*>(a.momentum);
  // Everything the loop reads is local to the block function: the pointers re-declared __restrict__ and a local
  // copy of the coefficients, so their compile-time switches fold into the loop and it vectorises (through
  // captured references, or the captured copy itself, it does not). The coefficients are computed once per
  // chunk, not per block: Adam's two pow() calls per block cost more than the block's arithmetic (measured:
  // docs/design.md §5.1).
  const auto coefs = step_math::sgd_coefs<C>(a.lr, a.weight_decay, Momentum ? a.momentum_coef : 0.0, a.dampening,
                                             Nesterov, Maximize, Init);
  auto block = [=](auto to_buf, int64_t s, int64_t count, T* __restrict__ out) {
    auto k = coefs;
    k.decay = Decay;
    T* __restrict__ w_ = w;
    const T* __restrict__ b_ = b;
    const T* __restrict__ g_ = g;
    T* __restrict__ buf_ = buf;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = s + j;
      C bi = Momentum && !Init ? static_cast<C>(buf_[i]) : C(0);
      const C base = static_cast<C>(InPlace ? w_[i] : b_[i]);
      const C nw = step_math::sgd_element(base, static_cast<C>(g_[i]), bi, k);
      if constexpr (Momentum) buf_[i] = static_cast<T>(bi);
      if constexpr (decltype(to_buf)::value)
        out[j] = static_cast<T>(nw);
      else
        w_[i] = static_cast<T>(nw);
    }
  };
  over_blocks(w, n, streams<InPlace, T>(n), block);
}

template <typename T, bool InPlace, bool Momentum, bool Init>
void sgd_flags(const SgdStepArgs& a, int64_t n) {
  const bool decay = a.weight_decay != 0.0;
#define FP_SGD(NEST, MAX, DEC)                                 \
  if (a.nesterov == NEST && a.maximize == MAX && decay == DEC) \
  return sgd_t<T, InPlace, Momentum, Init, NEST, MAX, DEC>(a, n)
  FP_SGD(false, false, false);
  FP_SGD(false, false, true);
  FP_SGD(false, true, false);
  FP_SGD(false, true, true);
  FP_SGD(true, false, false);
  FP_SGD(true, false, true);
  FP_SGD(true, true, false);
  FP_SGD(true, true, true);
#undef FP_SGD
}

template <typename T>
void sgd_dispatch(const SgdStepArgs& a, int64_t n) {
  const bool in_place = a.backup == a.param;
  if (a.momentum == nullptr)
    return in_place ? sgd_flags<T, true, false, false>(a, n) : sgd_flags<T, false, false, false>(a, n);
  if (a.init_momentum) return in_place ? sgd_flags<T, true, true, true>(a, n) : sgd_flags<T, false, true, true>(a, n);
  return in_place ? sgd_flags<T, true, true, false>(a, n) : sgd_flags<T, false, true, false>(a, n);
}

template <typename T, bool InPlace, bool Amsgrad, bool Maximize, bool L2, bool Decoupled>
void adam_t(const AdamStepArgs& a, int64_t n) {
  using C = math::compute_t<T>;
  T* __restrict__ w = static_cast<T*>(a.param);
  const T* __restrict__ b = static_cast<const T*>(a.backup);
  const T* __restrict__ g = static_cast<const T*>(a.grad);
  T* __restrict__ m = static_cast<T*>(a.exp_avg);
  T* __restrict__ v = static_cast<T*>(a.exp_avg_sq);
  T* __restrict__ vmax = static_cast<T*>(a.max_exp_avg_sq);
  const auto coefs =
      step_math::adam_coefs<C>(a.lr, a.beta1, a.beta2, a.eps, a.step, a.weight_decay, a.decoupled, Maximize, Amsgrad);
  auto block = [=](auto to_buf, int64_t s, int64_t count, T* __restrict__ out) {  // all local: see sgd_t
    auto k = coefs;
    k.l2 = L2;
    k.decoupled = Decoupled;
    T* __restrict__ w_ = w;
    const T* __restrict__ b_ = b;
    const T* __restrict__ g_ = g;
    T* __restrict__ m_ = m;
    T* __restrict__ v_ = v;
    T* __restrict__ vmax_ = vmax;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = s + j;
      C mi = static_cast<C>(m_[i]);
      C vi = static_cast<C>(v_[i]);
      C xi = Amsgrad ? static_cast<C>(vmax_[i]) : C(0);
      const C base = static_cast<C>(InPlace ? w_[i] : b_[i]);
      const C nw = step_math::adam_element(base, static_cast<C>(g_[i]), mi, vi, xi, k);
      m_[i] = static_cast<T>(mi);
      v_[i] = static_cast<T>(vi);
      if constexpr (Amsgrad) vmax_[i] = static_cast<T>(xi);
      if constexpr (decltype(to_buf)::value)
        out[j] = static_cast<T>(nw);
      else
        w_[i] = static_cast<T>(nw);
    }
  };
  over_blocks(w, n, streams<InPlace, T>(n), block);
}

template <typename T, bool InPlace, bool Amsgrad>
void adam_flags(const AdamStepArgs& a, int64_t n) {
  const auto k = step_math::adam_coefs<double>(a.lr, a.beta1, a.beta2, a.eps, a.step, a.weight_decay, a.decoupled,
                                               a.maximize, Amsgrad);
#define FP_ADAM(MAX, L2, DEC) \
  if (a.maximize == MAX && k.l2 == L2 && k.decoupled == DEC) return adam_t<T, InPlace, Amsgrad, MAX, L2, DEC>(a, n)
  FP_ADAM(false, false, false);
  FP_ADAM(false, false, true);
  FP_ADAM(false, true, false);
  FP_ADAM(true, false, false);
  FP_ADAM(true, false, true);
  FP_ADAM(true, true, false);
#undef FP_ADAM
}

template <typename T>
void adam_dispatch(const AdamStepArgs& a, int64_t n) {
  const bool in_place = a.backup == a.param;
  if (a.max_exp_avg_sq != nullptr) return in_place ? adam_flags<T, true, true>(a, n) : adam_flags<T, false, true>(a, n);
  return in_place ? adam_flags<T, true, false>(a, n) : adam_flags<T, false, false>(a, n);
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
