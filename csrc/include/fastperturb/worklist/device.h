// The device half of the work list: the per-block loop and the per-op element
// functors that both the CUDA kernels (csrc/cuda/kernels.cu) and the CPU
// executor of the test build (csrc/testing/worklist_executor.cpp) run. Plain
// C++ compiled for host and device (FP_HD); the arithmetic of every element
// comes from fastperturb/math.h.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "fastperturb/math.h"
#include "fastperturb/worklist/launch_args.h"

namespace fastperturb {
namespace worklist {

using math::compute_t;

struct None {};

template <typename C>
struct Sums3 {
  C s0, s1, s2;
};

// ---------------------------------------------------------------------------
// Reductions: each lane sums runs of kLaneRun elements in the op's compute type and adds each run's sum into its
// total in double, and a block's lanes are combined in double, as the CPU kernels' lanes do (cpu/loops.h: 64
// elements a lane in the compute type, then double). Summed in float over a lane's 128 elements and across a
// block's 512 lanes, float32 values of 1e17-2e18 overflowed to inf where the CPU op and the reference are finite.
constexpr int kLaneRun = 64;

template <typename A>
struct WideOf {
  using type = A;  // double, Sums3<double>, None
};
template <>
struct WideOf<float> {
  using type = double;
};
template <>
struct WideOf<Sums3<float>> {
  using type = Sums3<double>;
};
template <typename A>
using wide_t = typename WideOf<A>::type;

FP_HD double widen(float a) { return static_cast<double>(a); }
FP_HD double widen(double a) { return a; }
FP_HD None widen(None a) { return a; }
template <typename C>
FP_HD Sums3<double> widen(const Sums3<C>& a) {
  return Sums3<double>{static_cast<double>(a.s0), static_cast<double>(a.s1), static_cast<double>(a.s2)};
}

// The three-column sums' combine and store, shared by the ops that reduce Sums3 and by their finalize.
FP_HD Sums3<double> add3(const Sums3<double>& a, const Sums3<double>& b) {
  return Sums3<double>{a.s0 + b.s0, a.s1 + b.s1, a.s2 + b.s2};
}
FP_HD void store3(const Sums3<double>& acc, double* out) {
  out[0] = acc.s0;
  out[1] = acc.s1;
  out[2] = acc.s2;
}

// ---------------------------------------------------------------------------
// The per-block loop (host and device).

FP_HD bool vec_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0; }

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kWidth = static_cast<int>(kVecBytes / sizeof(T));
  T v[kWidth];
};

// The i-th vector from p. On the host (the CPU executor) every vector access is
// checked to be aligned, as a GPU's 16-byte loads and stores must be.
template <typename T>
FP_HD Vec<T>* vec_at(T* p, int64_t i) {
  Vec<T>* v = reinterpret_cast<Vec<T>*>(p) + i;
#if !defined(__CUDA_ARCH__)
  if (!vec_aligned(v)) throw std::logic_error("work list: misaligned vector access");
#endif
  return v;
}

// Runs block `b` of a launch as lane `lane` of `nlanes` (a thread of the CUDA
// block, or one of the CPU executor's emulated lanes), folding this lane's
// reduction into `acc`. The chunk is processed with vector loads when every
// list the op touches is 16-byte aligned at the chunk's start (then the
// first floor(n / W) * W elements go by vectors of W, the rest one by one),
// else element by element. Lane k takes vectors (and leftover elements) k,
// k + nlanes, ... Its reduction goes into `total` by runs of kLaneRun elements.
template <class Op>
FP_HD void run_block(const LaunchArgs<Op::kDepth>& a, int b, const Op& op, int lane, int nlanes,
                     wide_t<typename Op::Acc>& total) {
  using T = typename Op::scalar_t;
  constexpr int D = Op::kDepth;
  constexpr int W = Vec<T>::kWidth;
  const int t = a.block_tensor[b];
  const Range r = chunk_range(a.numel[t], a.block_chunk[b], a.chunk_size);
  const typename Op::PerTensor pt = op.tensor(a.index[t]);
  T* p[D];
  bool vec = true;
  for (int d = 0; d < D; ++d) {
    p[d] = a.ptr[d][t] == nullptr ? nullptr : static_cast<T*>(a.ptr[d][t]) + r.begin;
    if (op.reads(d) || op.writes(d)) vec = vec && vec_aligned(p[d]);
  }
  const int64_t n = r.end - r.begin;
  int64_t done = 0;
  typename Op::Acc acc = op.identity();
  int run = 0;
  auto flush_at = [&](int limit) {
    if (run < limit) return;
    total = op.combine(total, widen(acc));
    acc = op.identity();
    run = 0;
  };
  if (vec) {
    const int64_t nv = n / W;
    for (int64_t i = lane; i < nv; i += nlanes) {
      Vec<T> v[D] = {};
      for (int d = 0; d < D; ++d)
        if (op.reads(d)) v[d] = *vec_at(p[d], i);
      for (int k = 0; k < W; ++k) {
        T x[D];
        for (int d = 0; d < D; ++d) x[d] = v[d].v[k];
        op.element(x, acc, pt);
        for (int d = 0; d < D; ++d) v[d].v[k] = x[d];
      }
      for (int d = 0; d < D; ++d)
        if (op.writes(d)) *vec_at(p[d], i) = v[d];
      run += W;
      flush_at(kLaneRun);
    }
    done = nv * W;
  }
  for (int64_t i = done + lane; i < n; i += nlanes) {
    T x[D] = {};
    for (int d = 0; d < D; ++d)
      if (op.reads(d)) x[d] = p[d][i];
    op.element(x, acc, pt);
    for (int d = 0; d < D; ++d)
      if (op.writes(d)) p[d][i] = x[d];
    ++run;
    flush_at(kLaneRun);
  }
  flush_at(1);
}

// Folds lane `lane` of `nlanes` of finalize block j: the slots of one tensor.
template <class F>
FP_HD void run_finalize(const FinalizeArgs& f, int j, const F& fin, int lane, int nlanes, typename F::Acc& acc) {
  const int64_t begin = f.slot_begin[j];
  for (int64_t s = lane; s < f.slot_count[j]; s += nlanes) acc = fin.combine(acc, fin.load(begin + s));
}

// ---------------------------------------------------------------------------
// The op functors. Each names its lists (kDepth), which it reads and writes,
// what it reduces (Acc, kSlots doubles per block) and what one element does;
// a reducing op's combine and store take wide_t<Acc>, the type its lanes' runs are added into.

// norms: one list; per block the sum of squares (L2) or max |x| (Linf).
template <typename T>
struct NormsOp {
  static constexpr int kDepth = 1;
  static constexpr int kSlots = 1;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = C;
  using PerTensor = None;
  math::Norm norm;

  FP_HD bool reads(int) const { return true; }
  FP_HD bool writes(int) const { return false; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return C(0); }
  FP_HD void element(T (&x)[1], Acc& acc, const PerTensor&) const {
    acc = math::norm_accumulate(acc, static_cast<C>(x[0]), norm);
  }
  FP_HD double combine(double a, double b) const { return math::norm_combine(a, b, norm); }
  FP_HD void store(double acc, double* out) const { out[0] = acc; }
};

// grad_stats_: lists (grads, accum, params, backups); the last three may be
// absent. Per block [sum (t g)^2, sum d g, sum d^2]; accum (+)= w g.
template <typename T>
struct StatsOp {
  static constexpr int kDepth = 4;
  static constexpr int kSlots = 3;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = Sums3<C>;
  using PerTensor = None;
  C accum_weight;
  C eta;
  bool accum_init;
  bool has_accum;
  bool has_params;
  bool has_backups;
  bool adaptive;

  FP_HD bool reads(int d) const {
    return d == 0 || (d == 1 && has_accum && !accum_init) || (d == 2 && has_params && (adaptive || has_backups)) ||
           (d == 3 && has_backups);
  }
  FP_HD bool writes(int d) const { return d == 1 && has_accum; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return Acc{C(0), C(0), C(0)}; }
  FP_HD void element(T (&x)[4], Acc& acc, const PerTensor&) const {
    const C g = static_cast<C>(x[0]);
    const C w = static_cast<C>(x[2]);
    const C b = static_cast<C>(x[3]);
    math::stats_element(g, w, b, eta, adaptive, has_backups, acc.s0, acc.s1, acc.s2);
    if (has_accum) x[1] = static_cast<T>(math::accum_element(static_cast<C>(x[1]), g, accum_weight, accum_init));
  }
  FP_HD Sums3<double> combine(const Sums3<double>& a, const Sums3<double>& b) const { return add3(a, b); }
  FP_HD void store(const Sums3<double>& acc, double* out) const { store3(acc, out); }
};

// ascent_step_: lists (params, grads, backups); per-tensor coefficients read
// from the float32 arrays step_coef[index], proj[index].
template <typename T>
struct AscentOp {
  static constexpr int kDepth = 3;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = None;
  using PerTensor = math::AscentCoefs<C>;
  const float* step_coef;
  const float* proj;
  C eta;
  math::Norm norm;
  bool first;
  bool zero_grads;

  FP_HD bool reads(int d) const { return d != 2 || !first; }
  FP_HD bool writes(int d) const { return d == 0 || (d == 1 && zero_grads) || (d == 2 && first); }
  FP_HD PerTensor tensor(int i) const {
    return PerTensor{static_cast<C>(step_coef[i]), static_cast<C>(proj[i]), eta, norm, first};
  }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[3], Acc&, const PerTensor& k) const {
    const C w = static_cast<C>(x[0]);
    const C b = first ? w : static_cast<C>(x[2]);
    const C nw = math::ascent_element(w, b, static_cast<C>(x[1]), k);
    if (first) x[2] = x[0];
    x[0] = static_cast<T>(nw);
    if (zero_grads) x[1] = static_cast<T>(C(0));
  }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// restore_: lists (params, backups); params = backups, element copies of the
// storage type (bit for bit).
template <typename T>
struct RestoreOp {
  static constexpr int kDepth = 2;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using Acc = None;
  using PerTensor = None;

  FP_HD bool reads(int d) const { return d == 1; }
  FP_HD bool writes(int d) const { return d == 0; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[2], Acc&, const PerTensor&) const { x[0] = x[1]; }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// restore_ and norms of the gradients in one pass (restore_norms_lists_): lists (grads, params, backups); per
// block the norm accumulator of the grads as NormsOp has it, and params = backups bit for bit. The norms equal
// NormsOp's over the grads bit for bit when the three lists share the vector path's alignment (a chunk whose
// params or backups are not 16-byte aligned goes element by element, a different lane split of the sum).
template <typename T>
struct RestoreNormsOp : NormsOp<T> {
  static constexpr int kDepth = 3;
  using typename NormsOp<T>::Acc;

  FP_HD bool reads(int d) const { return d != 1; }
  FP_HD bool writes(int d) const { return d == 1; }
  FP_HD void element(T (&x)[3], Acc& acc, const None& pt) const {
    T g[1] = {x[0]};
    NormsOp<T>::element(g, acc, pt);
    x[1] = x[2];
  }
};

// combine_grads_: lists (grads, accum); grads = accum + weight * grads.
template <typename T>
struct CombineOp {
  static constexpr int kDepth = 2;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = None;
  using PerTensor = None;
  C weight;

  FP_HD bool reads(int) const { return true; }
  FP_HD bool writes(int d) const { return d == 0; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[2], Acc&, const PerTensor&) const {
    x[0] = static_cast<T>(math::combine_element(static_cast<C>(x[1]), static_cast<C>(x[0]), weight));
  }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// Finalize of norms: combines a tensor's partials (double), writes the
// accumulator to acc_out[index] (when not null) and the norm, as float32, to
// out[index]. Also reduces the per-tensor accumulators into the total norm
// (one "tensor" whose slots are the n accumulators, acc_out = nullptr).
struct FinalizeNorm {
  using Acc = double;
  const double* in;
  double* acc_out;
  float* out;
  math::Norm norm;

  FP_HD Acc identity() const { return 0.0; }
  FP_HD Acc load(int64_t slot) const { return in[slot]; }
  FP_HD Acc combine(Acc a, Acc b) const { return math::norm_combine(a, b, norm); }
  FP_HD void store(int index, Acc acc) const {
    if (acc_out != nullptr) acc_out[index] = acc;
    out[index] = static_cast<float>(math::norm_finish(acc, norm));
  }
};

// Finalize of grad_stats_: sums a tensor's three partial columns into the
// float32 [n, 3] result.
struct FinalizeStats {
  using Acc = Sums3<double>;
  const double* in;
  float* out;

  FP_HD Acc identity() const { return Acc{0.0, 0.0, 0.0}; }
  FP_HD Acc load(int64_t slot) const { return Acc{in[3 * slot], in[3 * slot + 1], in[3 * slot + 2]}; }
  FP_HD Acc combine(const Acc& a, const Acc& b) const { return add3(a, b); }
  FP_HD void store(int index, const Acc& acc) const {
    out[3 * index] = static_cast<float>(acc.s0);
    out[3 * index + 1] = static_cast<float>(acc.s1);
    out[3 * index + 2] = static_cast<float>(acc.s2);
  }
};

// ---------------------------------------------------------------------------
// The SAM-family ops.

// dot_stats: lists (x, y), read-only; per block [sum x*x, sum x*y, sum y*y].
template <typename T>
struct DotOp {
  static constexpr int kDepth = 2;
  static constexpr int kSlots = 3;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = Sums3<C>;
  using PerTensor = None;

  FP_HD bool reads(int) const { return true; }
  FP_HD bool writes(int) const { return false; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return Acc{C(0), C(0), C(0)}; }
  FP_HD void element(T (&x)[2], Acc& acc, const PerTensor&) const {
    math::dot_element(static_cast<C>(x[0]), static_cast<C>(x[1]), acc.s0, acc.s1, acc.s2);
  }
  FP_HD Sums3<double> combine(const Sums3<double>& a, const Sums3<double>& b) const { return add3(a, b); }
  FP_HD void store(const Sums3<double>& acc, double* out) const { store3(acc, out); }
};

// lincomb_: lists (out, x, y), y possibly absent; out = c0*out + c1*x + c2*y with the coefficients read from
// the float32 [n, 3] array coef[3 * index ...]; per block the sum of squares of the stored values. Where
// c0 == 0 the loaded out values are ignored (lincomb_element), so whatever the buffer holds never leaks.
template <typename T>
struct LincombOp {
  static constexpr int kDepth = 3;
  static constexpr int kSlots = 1;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = C;
  using PerTensor = math::LincombCoefs<C>;
  const float* coef;
  bool has_y;

  FP_HD bool reads(int d) const { return d != 2 || has_y; }
  FP_HD bool writes(int d) const { return d == 0; }
  FP_HD PerTensor tensor(int i) const {
    const float c0 = coef[3 * i];
    return PerTensor{static_cast<C>(c0), static_cast<C>(coef[3 * i + 1]), static_cast<C>(coef[3 * i + 2]), c0 != 0.0f,
                     has_y};
  }
  FP_HD Acc identity() const { return C(0); }
  FP_HD void element(T (&x)[3], Acc& acc, const PerTensor& k) const {
    const C y = has_y ? static_cast<C>(x[2]) : C(0);
    x[0] = static_cast<T>(math::lincomb_element(static_cast<C>(x[0]), static_cast<C>(x[1]), y, k));
    const C stored = static_cast<C>(x[0]);
    acc += stored * stored;
  }
  FP_HD double combine(double a, double b) const { return a + b; }
  FP_HD void store(double acc, double* out) const { out[0] = acc; }
};

// ema_residual_: lists (grads, ema, params), params read only when adaptive; grads = the residual d, ema = the
// new mean (math::ema_element); per block the sum of (t d)^2 over the stored residuals.
template <typename T>
struct EmaOp {
  static constexpr int kDepth = 3;
  static constexpr int kSlots = 1;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = C;
  using PerTensor = None;
  math::EmaCoefs<C> k;
  C eta;
  bool adaptive;

  FP_HD bool reads(int d) const { return d == 0 || (d == 1 && !k.init) || (d == 2 && adaptive); }
  FP_HD bool writes(int d) const { return d != 2; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return C(0); }
  FP_HD void element(T (&x)[3], Acc& acc, const PerTensor&) const {
    C d, m_new;
    math::ema_element(static_cast<C>(x[0]), k.init ? C(0) : static_cast<C>(x[1]), k, d, m_new);
    x[0] = static_cast<T>(d);
    x[1] = static_cast<T>(m_new);
    acc += math::scaled_square(static_cast<C>(x[0]), adaptive ? static_cast<C>(x[2]) : C(0), eta, adaptive);
  }
  FP_HD double combine(double a, double b) const { return a + b; }
  FP_HD void store(double acc, double* out) const { out[0] = acc; }
};

// Finalize of a one-column sum (lincomb_, ema_residual_): a tensor's partials summed in double into the
// float32 [n] result.
struct FinalizeSum {
  using Acc = double;
  const double* in;
  float* out;

  FP_HD Acc identity() const { return 0.0; }
  FP_HD Acc load(int64_t slot) const { return in[slot]; }
  FP_HD Acc combine(Acc a, Acc b) const { return a + b; }
  FP_HD void store(int index, Acc acc) const { out[index] = static_cast<float>(acc); }
};

}  // namespace worklist
}  // namespace fastperturb
