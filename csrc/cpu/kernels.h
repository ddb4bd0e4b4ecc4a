// The per-chunk kernels of the CPU ops, behind a table of function pointers so
// one build carries several instruction-set variants (kernels_default.cpp,
// kernels_avx2.cpp) and picks one at run time (kernels.cpp). Each kernel does
// one chunk of one tensor: pointers are the tensors' data pointers (already
// offset to the chunk), n the element count, dtype the tensors' dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <fastperturb/math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/stream_stores.h"

namespace fastperturb {
namespace cpu {

using math::compute_t;

struct StatsArgs {
  const void* grad;
  void* accum;         // nullptr: no accumulation
  const void* param;   // nullptr unless adaptive or has_delta
  const void* backup;  // nullptr: no delta statistics
  double accum_weight;
  bool accum_init;
  bool adaptive;
  double adaptive_eta;
};

struct AscentArgs {
  void* param;
  void* grad;
  void* backup;
  float step;
  float proj;
  math::Norm norm;
  bool first;
  bool adaptive;
  double adaptive_eta;
  bool zero_grads;
};

struct LincombArgs {
  void* out;
  const void* x;
  const void* y;  // nullptr: no y term
  float c0, c1, c2;
};

struct EmaArgs {
  void* grad;
  void* ema;
  const void* param;  // nullptr unless adaptive
  double grad_scale, sigma, lmbda;
  bool init;
  bool adaptive;
  double adaptive_eta;
};

struct KernelTable {
  const char* isa;
  // out = sum of squares (ord 2) or NaN-propagating max |x| (ord inf). Unless dst is null, also copies n elements
  // of x's dtype from src to dst, bit for bit, in the same pass (restore_norms_lists_).
  double (*norm)(at::ScalarType dtype, const void* x, int64_t n, bool inf, void* dst, const void* src);
  // out[0..2] = sums of (t g)^2, d g, d^2; also writes accum if given.
  void (*stats)(at::ScalarType dtype, const StatsArgs& a, int64_t n, double* out);
  void (*ascent)(at::ScalarType dtype, const AscentArgs& a, int64_t n);
  void (*combine)(at::ScalarType dtype, void* grad, const void* accum, double weight, int64_t n);
  // dst[0..bytes) = src[0..bytes), bit for bit (restore_): memcpy, streaming when bytes >= kStreamMinBytes.
  void (*copy)(void* dst, const void* src, int64_t bytes);
  // out[0..2] = sums of x*x, x*y, y*y.
  void (*dot)(at::ScalarType dtype, const void* x, const void* y, int64_t n, double* out);
  // Writes out; returns the sum of squares of the stored values.
  double (*lincomb)(at::ScalarType dtype, const LincombArgs& a, int64_t n);
  // Writes grad (the residual) and ema; returns the sum of (t d)^2 over the stored residuals.
  double (*ema)(at::ScalarType dtype, const EmaArgs& a, int64_t n);
};

// The variants compiled in; nullptr when a variant is not built for this CPU architecture.
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();

// The best variant this CPU runs (chosen once). FASTPERTURB_CPU_ISA=default forces the portable one.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace fastperturb
