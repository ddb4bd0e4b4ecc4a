// The CPU implementations of the SAM-family ops (dot_stats, lincomb_, ema_residual_; schemas and semantics in
// csrc/include/fastperturb/schemas.h, spec in fastperturb/ops/reference.py). As in ops.cpp: every argument is
// checked (common/checks.h) before anything is written, one chunk plan covers the whole list (plan.h), the
// per-chunk kernels (kernels.h, loops.h) run in one parallel region, and the chunk partials of each tensor are
// combined in chunk order, in double, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/versions.h"
#include "cpu/kernels.h"
#include "cpu/op_common.h"
#include "cpu/plan.h"

namespace fastperturb {
namespace cpu {
namespace {

at::TensorOptions f32_cpu() { return at::TensorOptions().dtype(at::kFloat).device(at::kCPU); }

// Sums the K partials of every chunk of each tensor, in chunk order, into float32 out[i * K + k].
template <int K>
void sum_partials(const Plan& plan, size_t n, const std::vector<double>& partial, float* out) {
  for (size_t i = 0; i < n; ++i) {
    double s[K] = {};
    for (int64_t c = plan.first_chunk(i); c < plan.first_chunk(i + 1); ++c)
      for (int k = 0; k < K; ++k) s[k] += partial[K * c + k];
    for (int k = 0; k < K; ++k) out[K * i + k] = static_cast<float>(s[k]);
  }
}

at::Tensor dot_stats_cpu(at::TensorList x, at::TensorList y) {
  checks::check_dot_stats(x, y);
  const size_t n = x.size();
  at::Tensor out = at::empty({static_cast<int64_t>(n), 3}, f32_cpu());
  const Plan plan = plan_over(x);
  std::vector<double> partial(3 * plan.num_chunks());
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const at::Tensor& xi = x[ch.tensor];
    k.dot(xi.scalar_type(), elem_ptr(xi, ch.begin), elem_ptr(y[ch.tensor], ch.begin), ch.size, &partial[3 * c]);
  });
  sum_partials<3>(plan, n, partial, out.data_ptr<float>());
  return out;
}

at::Tensor lincomb_cpu(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coef) {
  checks::check_lincomb(out, x, y, coef);
  const size_t n = out.size();
  const at::Tensor coef_c = coef.contiguous();
  const float* cp = coef_c.data_ptr<float>();
  at::Tensor sq = at::empty({static_cast<int64_t>(n)}, f32_cpu());
  bump_versions(out);
  const Plan plan = plan_over(out);
  std::vector<double> partial(plan.num_chunks());
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::Tensor& o = out[i];
    LincombArgs a{};
    a.out = elem_ptr(o, ch.begin);
    a.x = elem_ptr(x[i], ch.begin);
    a.y = y.empty() ? nullptr : elem_ptr(y[i], ch.begin);
    a.c0 = cp[3 * i];
    a.c1 = cp[3 * i + 1];
    a.c2 = cp[3 * i + 2];
    partial[c] = k.lincomb(o.scalar_type(), a, ch.size);
  });
  sum_partials<1>(plan, n, partial, sq.data_ptr<float>());
  return sq;
}

at::Tensor ema_residual_cpu(at::TensorList grads, at::TensorList ema, at::TensorList params, double sigma, double lmbda,
                            bool init, double grad_scale, double adaptive_eta) {
  checks::check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta);
  const size_t n = grads.size();
  const bool adaptive = adaptive_eta >= 0;
  at::Tensor stat = at::empty({static_cast<int64_t>(n)}, f32_cpu());
  bump_versions(grads);
  bump_versions(ema);
  const Plan plan = plan_over(grads);
  std::vector<double> partial(plan.num_chunks());
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::Tensor& g = grads[i];
    EmaArgs a{};
    a.grad = elem_ptr(g, ch.begin);
    a.ema = elem_ptr(ema[i], ch.begin);
    a.param = adaptive ? elem_ptr(params[i], ch.begin) : nullptr;
    a.grad_scale = grad_scale;
    a.sigma = sigma;
    a.lmbda = lmbda;
    a.init = init;
    a.adaptive = adaptive;
    a.adaptive_eta = adaptive_eta;
    partial[c] = k.ema(g.scalar_type(), a, ch.size);
  });
  sum_partials<1>(plan, n, partial, stat.data_ptr<float>());
  return stat;
}

void register_impls(torch::Library& m) {
  m.impl("dot_stats", &dot_stats_cpu);
  m.impl("lincomb_", &lincomb_cpu);
  m.impl("ema_residual_", &ema_residual_cpu);
}

// The CompositeExplicitAutograd kernels (all lists empty, or a device without a kernel): see require_cpu.
at::Tensor dot_stats_any(at::TensorList x, at::TensorList y) {
  require_cpu("dot_stats", {x, y});
  return dot_stats_cpu(x, y);
}

at::Tensor lincomb_any(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coef) {
  require_cpu("lincomb_", {out, x, y}, {&coef});
  return lincomb_cpu(out, x, y, coef);
}

at::Tensor ema_residual_any(at::TensorList grads, at::TensorList ema, at::TensorList params, double sigma, double lmbda,
                            bool init, double grad_scale, double adaptive_eta) {
  require_cpu("ema_residual_", {grads, ema, params});
  return ema_residual_cpu(grads, ema, params, sigma, lmbda, init, grad_scale, adaptive_eta);
}

}  // namespace
}  // namespace cpu
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CPU, m) { fastperturb::cpu::register_impls(m); }

TORCH_LIBRARY_IMPL(fastperturb, CompositeExplicitAutograd, m) {
  using namespace fastperturb::cpu;
  m.impl("dot_stats", &dot_stats_any);
  m.impl("lincomb_", &lincomb_any);
  m.impl("ema_residual_", &ema_residual_any);
}

// Sparse and MKL-DNN CPU tensors reach the argument checks (a TypeError naming the argument), as in ops.cpp.
TORCH_LIBRARY_IMPL(fastperturb, SparseCPU, m) { fastperturb::cpu::register_impls(m); }
TORCH_LIBRARY_IMPL(fastperturb, SparseCsrCPU, m) { fastperturb::cpu::register_impls(m); }
TORCH_LIBRARY_IMPL(fastperturb, MkldnnCPU, m) { fastperturb::cpu::register_impls(m); }
