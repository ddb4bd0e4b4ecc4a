// ascent_coefficients on the CPU (schema: csrc/include/fastperturb/schemas.h; arithmetic: math.h's ascent_step_coef,
// moved_sq and projection_coef, shared with the CUDA kernel; spec: fastperturb/ops/reference.py). Between the
// parameter-sized passes of a step the engine turns the per-tensor statistics into the ascent step's coefficients: as
// torch ops that is a dozen dispatches on [n]-vectors, each costing tens of microseconds on a host whose caches the
// passes have just flushed; here it is one call. The arithmetic is the reference's, operation for operation, in
// double (the build's -ffp-contract=off keeps every product rounded): per-tensor results equal it bit for bit, sums
// over all tensors differ only in order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "fastperturb/math.h"

namespace fastperturb {
namespace cpu {
namespace {

template <typename T>
std::tuple<at::Tensor, at::Tensor> coefficients(const at::Tensor& stats, const at::Tensor& eta_t,
                                                const at::Tensor& radius_t, bool global_scope, bool project) {
  const int64_t n = stats.size(0);
  const T* s = stats.data_ptr<T>();
  const double* eta = eta_t.data_ptr<double>();
  const double* radius = radius_t.data_ptr<double>();
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor step_t = at::empty({n}, f32), proj_t = at::empty({n}, f32);
  float* step_out = step_t.data_ptr<float>();
  float* proj_out = proj_t.data_ptr<float>();
  auto col = [&](int64_t i, int c) { return static_cast<double>(s[3 * i + c]); };
  double gg_sum = 0.0;
  if (global_scope)
    for (int64_t i = 0; i < n; ++i) gg_sum += col(i, 0);
  std::vector<double> step(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    step[i] = math::ascent_step_coef(eta[i], global_scope ? gg_sum : col(i, 0));
    step_out[i] = static_cast<float>(step[i]);
  }
  if (!project) {
    std::fill(proj_out, proj_out + n, 1.0f);
    return {step_t, proj_t};
  }
  auto uu = [&](int64_t i) { return math::moved_sq(step[i], col(i, 0), col(i, 1), col(i, 2)); };
  if (!global_scope) {
    for (int64_t i = 0; i < n; ++i) proj_out[i] = static_cast<float>(math::projection_coef(radius[i], uu(i)));
    return {step_t, proj_t};
  }
  double r_max = 0.0;  // NaN if any radius is (as the reference's max): then nothing is projected
  for (int64_t i = 0; i < n; ++i) r_max = math::max_nan(r_max, radius[i]);
  double uu_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) uu_sum += math::ball_weight(r_max, radius[i]) * uu(i);
  for (int64_t i = 0; i < n; ++i)
    proj_out[i] = static_cast<float>(math::global_projection_coef(r_max, radius[i], uu_sum, uu(i)));
  return {step_t, proj_t};
}

std::tuple<at::Tensor, at::Tensor> ascent_coefficients_cpu(const at::Tensor& stats, const at::Tensor& step_size,
                                                           const at::Tensor& radius, bool global_scope, bool project) {
  checks::check_ascent_coefficients(stats, step_size, radius);
  const at::Tensor s = stats.contiguous(), eta = step_size.contiguous(), r = radius.contiguous();
  if (s.dtype() == at::kFloat) return coefficients<float>(s, eta, r, global_scope, project);
  return coefficients<double>(s, eta, r, global_scope, project);
}

}  // namespace
}  // namespace cpu
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CPU, m) { m.impl("ascent_coefficients", &fastperturb::cpu::ascent_coefficients_cpu); }
