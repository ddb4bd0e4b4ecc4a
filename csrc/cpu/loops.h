// The element loops of the CPU kernels, one chunk at a time. The arithmetic
// is fastperturb/math.h's; this file only loads, converts, loops and stores.
//
// No include guard on purpose: kernels_<isa>.cpp includes it once, after
// kernels.h, with FP_ISA naming the namespace of that instruction-set variant
// (and, for non-default variants, inside a `#pragma GCC target` region). It
// must not include anything itself, or those headers would be compiled for
// that instruction set too.
//
// Reductions (math.h's norm_accumulate/norm_combine, stats_element) have a fixed structure, independent of the
// instruction set and the number of threads: kLanes independent accumulators (element i of a block goes to lane i %
// kLanes), blocks of kBlock elements summed in the compute type and added lane-wise into double, lanes combined in
// order. The compiler maps the lanes onto vector registers without reordering anything (no -ffast-math needed), and
// every variant gives the same bits.
#ifndef FP_ISA
#error "define FP_ISA before including loops.h"
#endif

namespace fastperturb {
namespace cpu {
namespace FP_ISA {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 64 * kLanes;

template <typename T>
inline compute_t<T> load(const void* p, int64_t i) {
  return static_cast<compute_t<T>>(static_cast<const T*>(p)[i]);
}

// K reductions over n elements; body(i, acc, lane) folds element i into
// acc[k][lane]. Blocks of kBlock elements reduce in the compute type C; the
// block results are folded lane-wise into double with combine(a, b), and the
// lanes in order. The identity of every reduction here is 0. After each block,
// block_done(start, m) runs on its elements [start, start + m) while they are in
// L1: element-wise work beside the reduction goes there, in its own loop, which
// vectorises (stores inside body would keep the lanes from it).
template <typename C, int K, typename Body, typename Combine, typename BlockDone>
inline void lane_reduce(int64_t n, const Body& body, const Combine& combine, double* out, const BlockDone& block_done) {
  double total[K][kLanes] = {};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, n - start);
    const int64_t full = m - m % kLanes;
    C acc[K][kLanes] = {};
    for (int64_t j = 0; j < full; j += kLanes)
      for (int l = 0; l < kLanes; ++l) body(start + j + l, acc, l);
    for (int64_t j = full; j < m; ++j) body(start + j, acc, static_cast<int>(j - full));
    block_done(start, m);
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < kLanes; ++l) total[k][l] = combine(total[k][l], static_cast<double>(acc[k][l]));
  }
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s = combine(s, total[k][l]);
    out[k] = s;
  }
}

template <typename C, int K, typename Body, typename Combine>
inline void lane_reduce(int64_t n, const Body& body, const Combine& combine, double* out) {
  lane_reduce<C, K>(n, body, combine, out, [](int64_t, int64_t) {});
}

inline double add(double a, double b) { return a + b; }

inline void copy_entry(void* dst, const void* src, int64_t bytes) {
  if (bytes < kStreamMinBytes) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
  stream_copy(dst, src, bytes);
  stream_fence();
}

// Sum of squares (L2) or NaN-propagating max |x| (Linf) of one chunk. With dst, also dst = src bit for bit, block
// by block beside the reduction (restore_ fused with the check of the descent gradient): three streams in one
// pass, where a read-only pass alone runs at about 60% of the triad's bytes per second here. The reduction is
// the same either way, so are its bits.
template <typename T, math::Norm N>
double norm_chunk(const T* x, int64_t n, void* dst = nullptr, const void* src = nullptr) {
  using C = compute_t<T>;
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const bool stream = dst != nullptr && bytes >= kStreamMinBytes;  // dst is write-only: see stream_stores.h
  double out[1];
  lane_reduce<C, 1>(
      n,
      [x](int64_t i, C(&acc)[1][kLanes], int l) {
        acc[0][l] = math::norm_accumulate(acc[0][l], static_cast<C>(x[i]), N);
      },
      [](double a, double b) { return math::norm_combine(a, b, N); }, out,
      [=](int64_t start, int64_t m) {
        if (dst == nullptr) return;
        char* d = static_cast<char*>(dst) + start * static_cast<int64_t>(sizeof(T));
        const char* s = static_cast<const char*>(src) + start * static_cast<int64_t>(sizeof(T));
        if (stream)
          stream_copy(d, s, m * static_cast<int64_t>(sizeof(T)));
        else
          std::memcpy(d, s, static_cast<size_t>(m) * sizeof(T));
      });
  if (stream) stream_fence();
  return out[0];
}

template <typename T>
double norm_t(const void* x, int64_t n, bool inf, void* dst, const void* src) {
  return inf ? norm_chunk<T, math::Norm::Linf>(static_cast<const T*>(x), n, dst, src)
             : norm_chunk<T, math::Norm::L2>(static_cast<const T*>(x), n, dst, src);
}

enum class Accum { None, Init, Add };

template <typename T, bool Adaptive, bool Delta, Accum A>
void stats_t(const StatsArgs& a, int64_t n, double* out) {
  using C = compute_t<T>;
  const T* g = static_cast<const T*>(a.grad);
  const T* w = static_cast<const T*>(a.param);
  const T* b = static_cast<const T*>(a.backup);
  T* acc = static_cast<T*>(a.accum);
  const C eta = static_cast<C>(a.adaptive_eta);
  const C weight = static_cast<C>(a.accum_weight);
  // An initialised accumulator is write-only: streamed (kStreamMinBytes) from a block buffer.
  const bool stream = A == Accum::Init && n * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
  lane_reduce<C, 3>(
      n,
      [=](int64_t i, C(&s)[3][kLanes], int l) {
        const C gi = static_cast<C>(g[i]);
        const C wi = (Adaptive || Delta) ? static_cast<C>(w[i]) : C(0);
        const C bi = Delta ? static_cast<C>(b[i]) : C(0);
        math::stats_element(gi, wi, bi, eta, Adaptive, Delta, s[0][l], s[1][l], s[2][l]);
      },
      add, out,
      [=](int64_t start, int64_t m) {
        if constexpr (A == Accum::Init) {
          T buf[kBlock];
          T* dst = stream ? buf : acc + start;
          for (int64_t j = 0; j < m; ++j)
            dst[j] = static_cast<T>(math::accum_element(C(0), static_cast<C>(g[start + j]), weight, true));
          if (stream) stream_copy(acc + start, buf, m * static_cast<int64_t>(sizeof(T)));
        } else if constexpr (A == Accum::Add) {
          for (int64_t i = start; i < start + m; ++i)
            acc[i] = static_cast<T>(math::accum_element(static_cast<C>(acc[i]), static_cast<C>(g[i]), weight, false));
        }
      });
  if (stream) stream_fence();
}

template <typename T, bool Adaptive, bool Delta>
void stats_accum(const StatsArgs& a, int64_t n, double* out) {
  if (a.accum == nullptr) return stats_t<T, Adaptive, Delta, Accum::None>(a, n, out);
  if (a.accum_init) return stats_t<T, Adaptive, Delta, Accum::Init>(a, n, out);
  return stats_t<T, Adaptive, Delta, Accum::Add>(a, n, out);
}

template <typename T>
void stats_dispatch(const StatsArgs& a, int64_t n, double* out) {
  const bool delta = a.backup != nullptr;
  if (a.adaptive) return delta ? stats_accum<T, true, true>(a, n, out) : stats_accum<T, true, false>(a, n, out);
  return delta ? stats_accum<T, false, true>(a, n, out) : stats_accum<T, false, false>(a, n, out);
}

template <typename T, math::Norm N, bool First, bool Adaptive>
void ascent_t(const AscentArgs& a, int64_t n) {
  using C = compute_t<T>;
  T* w = static_cast<T*>(a.param);
  const T* g = static_cast<const T*>(a.grad);
  T* b = static_cast<T*>(a.backup);
  // Norm, First and Adaptive are compile-time constants here, so the branches
  // of ascent_element fold away and the loop vectorises.
  const math::AscentCoefs<C> k{static_cast<C>(a.step), static_cast<C>(a.proj),
                               Adaptive ? static_cast<C>(a.adaptive_eta) : C(-1), N, First};
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const bool stream = bytes >= kStreamMinBytes;
  if (First && stream) {
    // The backup is write-only: stream a block of w's bits into it (the stored value itself: restore is
    // exact), then update that block of w while it is still in L1.
    constexpr int64_t kSub = kStreamBlockBytes / sizeof(T);
    for (int64_t s = 0; s < n; s += kSub) {
      const int64_t m = std::min(kSub, n - s);
      stream_copy(b + s, w + s, m * static_cast<int64_t>(sizeof(T)));
      for (int64_t i = s; i < s + m; ++i)
        w[i] = static_cast<T>(math::ascent_element(static_cast<C>(w[i]), C(0), static_cast<C>(g[i]), k));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T old = w[i];
      const C bi = First ? C(0) : static_cast<C>(b[i]);
      const T nw = static_cast<T>(math::ascent_element(static_cast<C>(old), bi, static_cast<C>(g[i]), k));
      if constexpr (First) b[i] = old;  // the backup is the stored value itself: restore is exact
      w[i] = nw;
    }
  }
  if (a.zero_grads) {  // all-zero bits are +0
    if (stream)
      stream_zero(a.grad, bytes);
    else
      std::memset(a.grad, 0, static_cast<size_t>(bytes));
  }
  if ((First || a.zero_grads) && stream) stream_fence();
}

template <typename T, math::Norm N>
void ascent_first(const AscentArgs& a, int64_t n) {
  if (a.first) return a.adaptive ? ascent_t<T, N, true, true>(a, n) : ascent_t<T, N, true, false>(a, n);
  return a.adaptive ? ascent_t<T, N, false, true>(a, n) : ascent_t<T, N, false, false>(a, n);
}

template <typename T>
void ascent_dispatch(const AscentArgs& a, int64_t n) {
  if (a.norm == math::Norm::L2) return ascent_first<T, math::Norm::L2>(a, n);
  return ascent_first<T, math::Norm::Linf>(a, n);
}

template <typename T>
void combine_t(void* grad, const void* accum, double weight, int64_t n) {
  using C = compute_t<T>;
  T* g = static_cast<T*>(grad);
  const T* acc = static_cast<const T*>(accum);
  const C wt = static_cast<C>(weight);
  for (int64_t i = 0; i < n; ++i)
    g[i] = static_cast<T>(math::combine_element(static_cast<C>(acc[i]), static_cast<C>(g[i]), wt));
}

template <typename T>
void dot_t(const void* xp, const void* yp, int64_t n, double* out) {
  using C = compute_t<T>;
  const T* x = static_cast<const T*>(xp);
  const T* y = static_cast<const T*>(yp);
  lane_reduce<C, 3>(
      n,
      [=](int64_t i, C(&s)[3][kLanes], int l) {
        math::dot_element(static_cast<C>(x[i]), static_cast<C>(y[i]), s[0][l], s[1][l], s[2][l]);
      },
      add, out);
}

// ReadOut and HasY are compile-time so the branches of lincomb_element fold away.
template <typename T, bool ReadOut, bool HasY>
double lincomb_t(const LincombArgs& a, int64_t n) {
  using C = compute_t<T>;
  T* o = static_cast<T*>(a.out);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  const math::LincombCoefs<C> k{static_cast<C>(a.c0), static_cast<C>(a.c1), static_cast<C>(a.c2), ReadOut, HasY};
  double out[1];
  lane_reduce<C, 1>(
      n,
      [=](int64_t i, C(&s)[1][kLanes], int l) {
        const C oi = ReadOut ? static_cast<C>(o[i]) : C(0);
        const C yi = HasY ? static_cast<C>(y[i]) : C(0);
        const T v = static_cast<T>(math::lincomb_element(oi, static_cast<C>(x[i]), yi, k));
        o[i] = v;
        const C stored = static_cast<C>(v);
        s[0][l] += stored * stored;
      },
      add, out);
  return out[0];
}

template <typename T>
double lincomb_dispatch(const LincombArgs& a, int64_t n) {
  const bool read_out = a.c0 != 0.0f;  // NaN != 0: a NaN c0 reads (and propagates)
  if (read_out) return a.y != nullptr ? lincomb_t<T, true, true>(a, n) : lincomb_t<T, true, false>(a, n);
  return a.y != nullptr ? lincomb_t<T, false, true>(a, n) : lincomb_t<T, false, false>(a, n);
}

template <typename T, bool Init, bool Adaptive>
double ema_t(const EmaArgs& a, int64_t n) {
  using C = compute_t<T>;
  T* g = static_cast<T*>(a.grad);
  T* m = static_cast<T*>(a.ema);
  const T* w = static_cast<const T*>(a.param);
  const math::EmaCoefs<C> k{static_cast<C>(a.grad_scale), static_cast<C>(a.sigma), static_cast<C>(a.lmbda),
                            static_cast<C>(1.0 - a.lmbda), Init};
  const C eta = static_cast<C>(a.adaptive_eta);
  double out[1];
  lane_reduce<C, 1>(
      n,
      [=](int64_t i, C(&s)[1][kLanes], int l) {
        C d, m_new;
        math::ema_element(static_cast<C>(g[i]), Init ? C(0) : static_cast<C>(m[i]), k, d, m_new);
        const T stored = static_cast<T>(d);
        g[i] = stored;
        m[i] = static_cast<T>(m_new);
        s[0][l] += math::scaled_square(static_cast<C>(stored), Adaptive ? static_cast<C>(w[i]) : C(0), eta, Adaptive);
      },
      add, out);
  return out[0];
}

template <typename T>
double ema_dispatch(const EmaArgs& a, int64_t n) {
  if (a.init) return a.adaptive ? ema_t<T, true, true>(a, n) : ema_t<T, true, false>(a, n);
  return a.adaptive ? ema_t<T, false, true>(a, n) : ema_t<T, false, false>(a, n);
}

// Type-erased entry points: one switch on the dtype per chunk.
#define FP_DTYPE_SWITCH(dtype, CALL)                                       \
  switch (dtype) {                                                         \
    case at::kFloat: {                                                     \
      using T = float;                                                     \
      CALL;                                                                \
    }                                                                      \
    case at::kDouble: {                                                    \
      using T = double;                                                    \
      CALL;                                                                \
    }                                                                      \
    case at::kHalf: {                                                      \
      using T = c10::Half;                                                 \
      CALL;                                                                \
    }                                                                      \
    case at::kBFloat16: {                                                  \
      using T = c10::BFloat16;                                             \
      CALL;                                                                \
    }                                                                      \
    default: TORCH_CHECK(false, "fastperturb: unsupported dtype ", dtype); \
  }

inline double norm_entry(at::ScalarType dtype, const void* x, int64_t n, bool inf, void* dst, const void* src) {
  FP_DTYPE_SWITCH(dtype, return norm_t<T>(x, n, inf, dst, src))
}
inline void stats_entry(at::ScalarType dtype, const StatsArgs& a, int64_t n, double* out) {
  FP_DTYPE_SWITCH(dtype, return stats_dispatch<T>(a, n, out))
}
inline void ascent_entry(at::ScalarType dtype, const AscentArgs& a, int64_t n) {
  FP_DTYPE_SWITCH(dtype, return ascent_dispatch<T>(a, n))
}
inline void combine_entry(at::ScalarType dtype, void* grad, const void* accum, double weight, int64_t n) {
  FP_DTYPE_SWITCH(dtype, return combine_t<T>(grad, accum, weight, n))
}
inline void dot_entry(at::ScalarType dtype, const void* x, const void* y, int64_t n, double* out) {
  FP_DTYPE_SWITCH(dtype, return dot_t<T>(x, y, n, out))
}
inline double lincomb_entry(at::ScalarType dtype, const LincombArgs& a, int64_t n) {
  FP_DTYPE_SWITCH(dtype, return lincomb_dispatch<T>(a, n))
}
inline double ema_entry(at::ScalarType dtype, const EmaArgs& a, int64_t n) {
  FP_DTYPE_SWITCH(dtype, return ema_dispatch<T>(a, n))
}
#undef FP_DTYPE_SWITCH

inline const KernelTable* table(const char* isa) {
  static const KernelTable t{isa,         &norm_entry, &stats_entry,   &ascent_entry, &combine_entry,
                             &copy_entry, &dot_entry,  &lincomb_entry, &ema_entry};
  return &t;
}

}  // namespace FP_ISA
}  // namespace cpu
}  // namespace fastperturb
