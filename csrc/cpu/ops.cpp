// The CPU implementations of the fastperturb ops (schemas in
// csrc/include/fastperturb/schemas.h, semantics in fastperturb/ops/reference.py).
// Each op checks all its arguments (common/checks.h) before writing anything, builds one chunk plan over the whole
// list (plan.h) and runs the per-chunk kernels (kernels.h) in one parallel
// region. Reductions combine the chunk partials per tensor, in chunk order,
// in double.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/handle_kernels.h"
#include "common/list_calls.h"
#include "common/versions.h"
#include "cpu/kernels.h"
#include "cpu/op_common.h"
#include "cpu/plan.h"

namespace fastperturb {
namespace cpu {
namespace {

using namespace checks;

// With `params` and `backups` (restore_norms_lists_), also params = backups, chunk by chunk in the same pass.
std::tuple<at::Tensor, at::Tensor> norms_run(at::TensorList tensors, double ord, const Plan& plan,
                                             at::TensorList params = {}, at::TensorList backups = {}) {
  const bool inf = std::isinf(ord);
  const size_t n = tensors.size();
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor per = at::empty({static_cast<int64_t>(n)}, opts);
  at::Tensor total = at::empty({}, opts);

  std::vector<double> partial(plan.num_chunks());
  const KernelTable& k = kernels();
  const bool restore = !params.empty();
  if (restore) bump_versions(params);
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const at::Tensor& t = tensors[ch.tensor];
    void* dst = restore ? elem_ptr(params[ch.tensor], ch.begin) : nullptr;
    const void* src = restore ? elem_ptr(backups[ch.tensor], ch.begin) : nullptr;
    partial[c] = k.norm(t.scalar_type(), elem_ptr(t, ch.begin), ch.size, inf, dst, src);
  });

  const math::Norm nrm = inf ? math::Norm::Linf : math::Norm::L2;
  float* per_p = per.data_ptr<float>();
  double acc = 0.0;  // over the whole list
  for (size_t i = 0; i < n; ++i) {
    double v = 0.0;
    for (int64_t c = plan.first_chunk(i); c < plan.first_chunk(i + 1); ++c) v = math::norm_combine(v, partial[c], nrm);
    per_p[i] = static_cast<float>(math::norm_finish(v, nrm));
    acc = math::norm_combine(acc, v, nrm);
  }
  *total.data_ptr<float>() = static_cast<float>(math::norm_finish(acc, nrm));
  return {per, total};
}

std::tuple<at::Tensor, at::Tensor> norms_cpu(at::TensorList tensors, double ord) {
  check_norms(tensors, ord);
  return norms_run(tensors, ord, plan_over(tensors));
}

at::Tensor grad_stats_run(at::TensorList grads, at::TensorList accum, at::TensorList params, at::TensorList backups,
                          double accum_weight, bool accum_init, double adaptive_eta, const Plan& plan) {
  const size_t n = grads.size();
  const bool adaptive = adaptive_eta >= 0;
  const bool has_delta = !backups.empty();
  const bool need_params = adaptive || has_delta;
  at::Tensor out = at::empty({static_cast<int64_t>(n), 3}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  bump_versions(accum);

  std::vector<double> partial(3 * plan.num_chunks());
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::Tensor& g = grads[i];
    StatsArgs a{};
    a.grad = elem_ptr(g, ch.begin);
    a.accum = accum.empty() ? nullptr : elem_ptr(accum[i], ch.begin);
    a.param = need_params ? elem_ptr(params[i], ch.begin) : nullptr;
    a.backup = has_delta ? elem_ptr(backups[i], ch.begin) : nullptr;
    a.accum_weight = accum_weight;
    a.accum_init = accum_init;
    a.adaptive = adaptive;
    a.adaptive_eta = adaptive_eta;
    k.stats(g.scalar_type(), a, ch.size, &partial[3 * c]);
  });

  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t c = plan.first_chunk(i); c < plan.first_chunk(i + 1); ++c)
      for (int j = 0; j < 3; ++j) s[j] += partial[3 * c + j];
    for (int j = 0; j < 3; ++j) o[3 * i + j] = static_cast<float>(s[j]);
  }
  return out;
}

at::Tensor grad_stats_cpu(at::TensorList grads, at::TensorList accum, at::TensorList params, at::TensorList backups,
                          double accum_weight, bool accum_init, double adaptive_eta) {
  check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta);
  return grad_stats_run(grads, accum, params, backups, accum_weight, accum_init, adaptive_eta, plan_over(grads));
}

void ascent_step_run(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& step_coef,
                     const at::Tensor& proj, c10::string_view norm, bool first, double adaptive_eta, bool zero_grads,
                     const Plan& plan) {
  const at::Tensor step_c = step_coef.contiguous();
  const at::Tensor proj_c = proj.contiguous();
  const float* step_p = step_c.data_ptr<float>();
  const float* proj_p = proj_c.data_ptr<float>();
  const math::Norm nrm = norm == "l2" ? math::Norm::L2 : math::Norm::Linf;
  bump_versions(params);
  if (first) bump_versions(backups);
  if (zero_grads) bump_versions(grads);

  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::Tensor& w = params[i];
    AscentArgs a{};
    a.param = elem_ptr(w, ch.begin);
    a.grad = elem_ptr(grads[i], ch.begin);
    a.backup = elem_ptr(backups[i], ch.begin);
    a.step = step_p[i];
    a.proj = proj_p[i];
    a.norm = nrm;
    a.first = first;
    a.adaptive = adaptive_eta >= 0;
    a.adaptive_eta = adaptive_eta;
    a.zero_grads = zero_grads;
    k.ascent(w.scalar_type(), a, ch.size);
  });
}

void ascent_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& step_coef,
                     const at::Tensor& proj, c10::string_view norm, bool first, double adaptive_eta, bool zero_grads) {
  check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta);
  ascent_step_run(params, grads, backups, step_coef, proj, norm, first, adaptive_eta, zero_grads, plan_over(params));
}

void restore_run(at::TensorList params, at::TensorList backups, const Plan& plan) {
  bump_versions(params);
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const at::Tensor& w = params[ch.tensor];
    // Streaming copy for large chunks: a plain store would first read the destination line.
    k.copy(elem_ptr(w, ch.begin), elem_ptr(backups[ch.tensor], ch.begin), ch.size * w.element_size());
  });
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_restore(params, backups);
  restore_run(params, backups, plan_over(params));
}

void combine_grads_run(at::TensorList grads, at::TensorList accum, double weight, const Plan& plan) {
  bump_versions(grads);
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const at::Tensor& g = grads[ch.tensor];
    k.combine(g.scalar_type(), elem_ptr(g, ch.begin), elem_ptr(accum[ch.tensor], ch.begin), weight, ch.size);
  });
}

void combine_grads_cpu(at::TensorList grads, at::TensorList accum, double weight) {
  check_combine_grads(grads, accum, weight);
  combine_grads_run(grads, accum, weight, plan_over(grads));
}

void register_impls(torch::Library& m) {
  m.impl("norms", &norms_cpu);
  m.impl("grad_stats_", &grad_stats_cpu);
  m.impl("ascent_step_", &ascent_step_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("combine_grads_", &combine_grads_cpu);
}

// The CompositeExplicitAutograd kernels (all lists empty, or a device without a kernel): see require_cpu.
std::tuple<at::Tensor, at::Tensor> norms_any(at::TensorList tensors, double ord) {
  require_cpu("norms", {tensors});
  return norms_cpu(tensors, ord);
}

at::Tensor grad_stats_any(at::TensorList grads, at::TensorList accum, at::TensorList params, at::TensorList backups,
                          double accum_weight, bool accum_init, double adaptive_eta) {
  require_cpu("grad_stats_", {grads, accum, params, backups});
  return grad_stats_cpu(grads, accum, params, backups, accum_weight, accum_init, adaptive_eta);
}

void ascent_step_any(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& step_coef,
                     const at::Tensor& proj, c10::string_view norm, bool first, double adaptive_eta, bool zero_grads) {
  require_cpu("ascent_step_", {params, grads, backups}, {&step_coef, &proj});
  ascent_step_cpu(params, grads, backups, step_coef, proj, norm, first, adaptive_eta, zero_grads);
}

void restore_any(at::TensorList params, at::TensorList backups) {
  require_cpu("restore_", {params, backups});
  restore_cpu(params, backups);
}

void combine_grads_any(at::TensorList grads, at::TensorList accum, double weight) {
  require_cpu("combine_grads_", {grads, accum});
  combine_grads_cpu(grads, accum, weight);
}

}  // namespace

// ---- the same ops on a TensorLists handle (schemas: fastperturb/list_schemas.h) ----------------------------
// Validated when the handle was built; here only the call's arguments, the handle's fingerprint and the gradients
// are checked (common/list_calls.h), and the work plan is the handle's. Reached through the handle-kernel table
// (common/handle_kernels.h) for CPU handles.

namespace {

using namespace list_calls;

std::tuple<at::Tensor, at::Tensor> norms_lists(const Lists& h, double ord, bool of_grads) {
  const std::vector<at::Tensor> grads = prepare_norms(*h, ord, of_grads);
  return norms_run(norms_input(*h, of_grads, grads), ord, h->cpu_plan());
}

at::Tensor grad_stats_lists(const Lists& h, bool with_accum, bool with_params, bool with_backups, double accum_weight,
                            bool accum_init, double adaptive_eta) {
  const std::vector<at::Tensor> grads =
      prepare_grad_stats(*h, with_accum, with_params, with_backups, accum_weight, adaptive_eta);
  return grad_stats_run(
      grads, with_accum ? h->list(kAccum) : at::TensorList(), with_params ? h->list(kParams) : at::TensorList(),
      with_backups ? h->list(kBackups) : at::TensorList(), accum_weight, accum_init, adaptive_eta, h->cpu_plan());
}

void ascent_step_lists(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                       bool first, double adaptive_eta, bool zero_grads) {
  const std::vector<at::Tensor> grads = prepare_ascent_step(*h, step_coef, proj, norm, adaptive_eta);
  ascent_step_run(h->list(kParams), grads, h->list(kBackups), step_coef, proj, norm, first, adaptive_eta, zero_grads,
                  h->cpu_plan());
}

std::tuple<at::Tensor, at::Tensor> restore_norms_lists(const Lists& h, double ord) {
  const std::vector<at::Tensor> grads = prepare_restore_norms(*h, ord);
  return norms_run(grads, ord, h->cpu_plan(), h->list(kParams), h->list(kBackups));
}

void restore_lists(const Lists& h) {
  prepare_restore(*h);
  restore_run(h->list(kParams), h->list(kBackups), h->cpu_plan());
}

void combine_grads_lists(const Lists& h, double weight) {
  const std::vector<at::Tensor> grads = prepare_combine_grads(*h, weight);
  combine_grads_run(grads, h->list(kAccum), weight, h->cpu_plan());
}

const bool handle_kernels_registered = [] {
  register_handle_kernels(c10::DeviceType::CPU,
                          HandleKernels{&norms_lists, &grad_stats_lists, &ascent_step_lists, &restore_lists,
                                        &restore_norms_lists, &combine_grads_lists});
  return true;
}();

}  // namespace

}  // namespace cpu
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CPU, m) { fastperturb::cpu::register_impls(m); }

TORCH_LIBRARY_IMPL(fastperturb, CompositeExplicitAutograd, m) {
  using namespace fastperturb::cpu;
  m.impl("norms", &norms_any);
  m.impl("grad_stats_", &grad_stats_any);
  m.impl("ascent_step_", &ascent_step_any);
  m.impl("restore_", &restore_any);
  m.impl("combine_grads_", &combine_grads_any);
}

// Sparse and MKL-DNN CPU tensors dispatch to these keys, not to CPU; the same
// kernels run there so the argument checks reject them with the TypeError
// every backend raises (instead of the dispatcher's NotImplementedError).
TORCH_LIBRARY_IMPL(fastperturb, SparseCPU, m) { fastperturb::cpu::register_impls(m); }
TORCH_LIBRARY_IMPL(fastperturb, SparseCsrCPU, m) { fastperturb::cpu::register_impls(m); }
TORCH_LIBRARY_IMPL(fastperturb, MkldnnCPU, m) { fastperturb::cpu::register_impls(m); }
