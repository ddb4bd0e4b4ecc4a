// The per-element and per-layer arithmetic of fastperturb's fused ops, written
// once and compiled into both the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Nothing here touches memory or threads: the kernels load an
// element, convert it to the compute type C (float, or double for float64
// tensors), call these functions and store the rounded result.
//
// fastperturb/ops/reference.py is the spec these functions implement; keep the
// two in step (docs/design.md §3.4).
#pragma once

#include <cfloat>
#include <cmath>

// Always inlined, on the host too: the CPU loops only vectorise when the element functions are inlined into them,
// and GCC's heuristics stop inlining them once a kernel has a few instantiations of its loop.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FP_HD inline __attribute__((always_inline))
#else
#define FP_HD inline
#endif

namespace fastperturb {
namespace math {

enum class Norm : int { L2 = 0, Linf = 1 };

// The type a tensor of storage type T is computed in: float (double for
// float64 tensors). Every kernel converts each element to it, and rounds once
// back to T.
template <typename T>
struct compute {
  using type = float;
};
template <>
struct compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename compute<T>::type;

// sign(g), keeping 0 as 0 and NaN as NaN (unlike torch.sign, which maps NaN
// to 0: a NaN gradient must never look like "no move").
template <typename C>
FP_HD C sign_of(C g) {
  return g > C(0) ? C(1) : (g < C(0) ? C(-1) : g);
}

// clamp(u, -r, r): a NaN in u stays NaN; a NaN radius clamps nothing (the comparisons are false), and a
// negative one gives r or -r by the same two comparisons. fastperturb/ops/reference.py and the Triton kernel
// compute it the same way.
template <typename C>
FP_HD C clamp_sym(C u, C r) {
  return u < -r ? -r : (u > r ? r : u);
}

// max(|x|, m), propagating NaN from either side.
template <typename C>
FP_HD C max_abs_nan(C m, C x) {
  C a = x < C(0) ? -x : x;
  if (a != a) return a;
  return a > m ? a : m;
}

// Combining two partial L-infinity results (each may be NaN).
template <typename C>
FP_HD C max_nan(C a, C b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// What one ascent step needs per tensor, converted to the compute type.
template <typename C>
struct AscentCoefs {
  C step;          // a = step_coef[i]
  C proj;          // l2: scale of the projection; linf: clamp radius
  C adaptive_eta;  // < 0: off; else dir = (|base| + eta)^2 * g (ASAM)
  Norm norm;
  bool first;  // backup := w and delta := 0 (the first step of a cycle)
};

// New weight value of one element after one projected ascent step.
// w: current weight, b: backup (pre-cycle weight; ignored when first), g: gradient.
template <typename C>
FP_HD C ascent_element(C w, C b, C g, const AscentCoefs<C>& k) {
  const C base = k.first ? w : b;
  const C delta = k.first ? C(0) : w - b;
  C dir = k.norm == Norm::L2 ? g : sign_of(g);
  if (k.adaptive_eta >= C(0)) {
    const C t = (base < C(0) ? -base : base) + k.adaptive_eta;
    dir = t * t * g;
  }
  C u = delta + k.step * dir;
  u = k.norm == Norm::L2 ? k.proj * u : clamp_sym(u, k.proj);
  return base + u;
}

// Per-element contributions to grad_stats_: s0 += (t*g)^2, s1 += d*g, s2 += d^2
// with d = w - b (when has_delta) and t = |w| + eta (when eta >= 0).
template <typename C>
FP_HD void stats_element(C g, C w, C b, C eta, bool adaptive, bool has_delta, C& s0, C& s1, C& s2) {
  C tg = g;
  if (adaptive) tg = ((w < C(0) ? -w : w) + eta) * g;
  s0 += tg * tg;
  if (has_delta) {
    const C d = w - b;
    s1 += d * g;
    s2 += d * d;
  }
}

// accum = weight*g (init) or accum + weight*g.
template <typename C>
FP_HD C accum_element(C acc, C g, C weight, bool init) {
  return init ? weight * g : acc + weight * g;
}

// grads = accum + weight * grads.
template <typename C>
FP_HD C combine_element(C acc, C g, C weight) {
  return acc + weight * g;
}

// Norm reductions (used by the multi-tensor kernels' per-chunk partials and
// their fixed-order combination): accumulate one element, combine two
// partials, and turn the final accumulator into the norm.
// L2 accumulates the sum of squares; L-infinity the NaN-propagating max |x|.
// 0 is the identity of both.
template <typename C>
FP_HD C norm_accumulate(C acc, C x, Norm n) {
  return n == Norm::L2 ? acc + x * x : max_abs_nan(acc, x);
}

template <typename C>
FP_HD C norm_combine(C a, C b, Norm n) {
  return n == Norm::L2 ? a + b : max_nan(a, b);
}

template <typename C>
FP_HD C norm_finish(C acc, Norm n) {
  return n == Norm::L2 ? std::sqrt(acc) : acc;
}

// ---------------------------------------------------------------------------
// The SAM-family ops (dot_stats, lincomb_, ema_residual_).

// x is finite (neither NaN nor +-inf), without a library call: x - x is 0 for
// every finite x and NaN otherwise.
template <typename C>
FP_HD bool is_finite(C x) {
  const C z = x - x;
  return z == z;
}

// Per-element contributions to dot_stats: s0 += x*x, s1 += x*y, s2 += y*y.
template <typename C>
FP_HD void dot_element(C x, C y, C& s0, C& s1, C& s2) {
  s0 += x * x;
  s1 += x * y;
  s2 += y * y;
}

// lincomb_'s per-tensor coefficients: out = c0*out + c1*x + c2*y.
template <typename C>
struct LincombCoefs {
  C c0, c1, c2;
  bool read_out;  // c0 != 0 (a NaN c0 included): else out is not read at all
  bool has_y;
};

// The new value of one element of out, the terms added left to right.
template <typename C>
FP_HD C lincomb_element(C out, C x, C y, const LincombCoefs<C>& k) {
  C v = k.c1 * x;
  if (k.read_out) v = k.c0 * out + v;
  if (k.has_y) v = v + k.c2 * y;
  return v;
}

// ema_residual_'s scalars in the compute type; lmbda_c = 1 - lmbda, taken in
// double on the host before the conversion (as the reference does).
template <typename C>
struct EmaCoefs {
  C grad_scale, sigma, lmbda, lmbda_c;
  bool init;
};

// One element of FriendlySAM's sweep: from the incoming gradient g_in and the
// running mean m, the residual d (the new gradient) and the new mean. Where g is
// not finite the mean keeps its value (init: starts at 0, as the old value is
// undefined there), so a bad gradient never poisons it.
template <typename C>
FP_HD void ema_element(C g_in, C m, const EmaCoefs<C>& k, C& d, C& m_new) {
  const C g = k.grad_scale * g_in;
  const bool ok = is_finite(g);
  if (k.init) {
    d = g;
    m_new = ok ? g : C(0);
  } else {
    d = g - k.sigma * m;
    m_new = ok ? k.lmbda * m + k.lmbda_c * g : m;
  }
}

// The statistic term of one stored residual d: (t*d)^2 with t = |w| + eta
// (adaptive) or 1.
template <typename C>
FP_HD C scaled_square(C d, C w, C eta, bool adaptive) {
  const C td = adaptive ? ((w < C(0) ? -w : w) + eta) * d : d;
  return td * td;
}

// ---------------------------------------------------------------------------
// ascent_coefficients (schemas.h): the l2 ascent step's per-tensor
// coefficients, in double, from grad_stats_'s row [gg, dg, dd] (or the sums
// of its columns over all tensors, for the global scope).

// a = eta / ||g||; 0 where that is NaN or +inf (||g|| = 0: eta/0 or 0/0),
// and the lowest double for -inf, as torch.nan_to_num(nan=0, posinf=0).
FP_HD double ascent_step_coef(double eta, double gg) {
  const double a = eta / std::sqrt(gg);
  if (a != a || a > DBL_MAX) return 0.0;
  return a < -DBL_MAX ? -DBL_MAX : a;
}

// ||d + a g||^2 from the row's terms, added left to right.
FP_HD double moved_sq(double a, double gg, double dg, double dd) { return dd + 2.0 * a * dg + a * a * gg; }

// The projection onto the radius r: r / u with u = sqrt(max(uu, 0)) when u
// exceeds r, else 1 (a NaN uu stays NaN through the clamp, so it gives 1).
FP_HD double projection_coef(double r, double uu) {
  const double u = std::sqrt(uu < 0.0 ? 0.0 : uu);
  return u > r ? r / u : 1.0;
}

// The global scope's ball with per-tensor radii (a param group's own eps) is
// the ellipsoid sum_i ||u_i||^2 / r_i^2 <= 1, summed in units of the largest
// radius R: tensor i's u^2 term counts (R / r_i)^2 times, exactly 1 when
// r_i = R, so one shared radius sums and projects as a plain ball. A tensor of
// radius 0 may not move: it counts 0 here and is projected on its own.
FP_HD double ball_weight(double r_max, double r) {
  if (!(r > 0.0)) return 0.0;
  if (r == r_max) return 1.0;
  const double q = r_max / r;
  return q * q;
}

// The projection of tensor i in that ball: by the weighed sum for r > 0, on
// its own radius 0 (its own u^2) otherwise.
FP_HD double global_projection_coef(double r_max, double r, double uu_sum, double uu_own) {
  return r > 0.0 ? projection_coef(r_max, uu_sum) : projection_coef(r, uu_own);
}

}  // namespace math
}  // namespace fastperturb
