// ascent_coefficients on the CPU (schema and formula: csrc/include/fastperturb/schemas.h; spec:
// fastperturb/ops/reference.py). Between the parameter-sized passes of a step the engine turns the per-tensor
// statistics into the ascent step's coefficients: as torch ops that is a dozen dispatches on [n]-vectors, each
// costing tens of microseconds on a host whose caches the passes have just flushed; here it is one call.
// The arithmetic is the reference's, operation for operation, in double (the build's -ffp-contract=off keeps
// every product rounded): per-tensor results equal it bit for bit, sums over all tensors differ only in order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace fastperturb {
namespace cpu {
namespace {

void check_vector(const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK_TYPE(t.dtype() == at::kDouble, "ascent_coefficients: ", name, " must be torch.float64, got ",
                   checks::dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "ascent_coefficients: ", name, " must have shape (", n,
                    ",) (one value per row of stats), got ", checks::tuple_str(t.sizes()));
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided, "ascent_coefficients: ", name,
                    " must be a dense CPU tensor");
}

// torch.nan_to_num(x, nan=0, posinf=0): the step where ||g|| = 0 (eta / 0, or 0 / 0).
double finite_or_zero(double x) {
  if (std::isnan(x) || x == std::numeric_limits<double>::infinity()) return 0.0;
  if (x == -std::numeric_limits<double>::infinity()) return std::numeric_limits<double>::lowest();
  return x;
}

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
  auto gg = [&](int64_t i) { return static_cast<double>(s[3 * i]); };
  double gg_sum = 0.0;
  if (global_scope)
    for (int64_t i = 0; i < n; ++i) gg_sum += gg(i);
  std::vector<double> step(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    step[i] = finite_or_zero(eta[i] / std::sqrt(global_scope ? gg_sum : gg(i)));
    step_out[i] = static_cast<float>(step[i]);
  }
  if (!project) {
    std::fill(proj_out, proj_out + n, 1.0f);
    return {step_t, proj_t};
  }
  auto uu = [&](int64_t i) {
    const double a = step[i];
    return static_cast<double>(s[3 * i + 2]) + 2.0 * a * static_cast<double>(s[3 * i + 1]) + a * a * gg(i);
  };
  double uu_sum = 0.0;
  if (global_scope)
    for (int64_t i = 0; i < n; ++i) uu_sum += uu(i);
  for (int64_t i = 0; i < n; ++i) {
    const double v = global_scope ? uu_sum : uu(i);
    const double u = std::sqrt(std::isnan(v) ? v : std::max(v, 0.0));  // clamp_min(0) keeps NaN
    proj_out[i] = static_cast<float>(u > radius[i] ? radius[i] / u : 1.0);
  }
  return {step_t, proj_t};
}

std::tuple<at::Tensor, at::Tensor> ascent_coefficients_cpu(const at::Tensor& stats, const at::Tensor& step_size,
                                                           const at::Tensor& radius, bool global_scope, bool project) {
  TORCH_CHECK_TYPE(stats.dtype() == at::kFloat || stats.dtype() == at::kDouble,
                   "ascent_coefficients: stats must be torch.float32 or torch.float64, got ",
                   checks::dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == 3,
                    "ascent_coefficients: stats must have shape (n, 3) (grad_stats_'s rows), got ",
                    checks::tuple_str(stats.sizes()));
  TORCH_CHECK_VALUE(stats.device().is_cpu() && stats.layout() == at::kStrided,
                    "ascent_coefficients: stats must be a dense CPU tensor");
  const int64_t n = stats.size(0);
  check_vector("step_size", step_size, n);
  check_vector("radius", radius, n);
  const at::Tensor s = stats.contiguous(), eta = step_size.contiguous(), r = radius.contiguous();
  if (s.dtype() == at::kFloat) return coefficients<float>(s, eta, r, global_scope, project);
  return coefficients<double>(s, eta, r, global_scope, project);
}

}  // namespace
}  // namespace cpu
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CPU, m) { m.impl("ascent_coefficients", &fastperturb::cpu::ascent_coefficients_cpu); }
