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

// The runs address each list through its tensors' base data pointers (`Bases`, op_common.h) and take the dtypes
// of the op's tensors (shared by its lists, checked): built from the tensors by the list ops, from the handle's
// fingerprints by the handle ops, before the parallel region, so the chunk loop reads no TensorImpl. Version
// counters are the callers' to bump.

// With `dst` and `src` (restore_norms_lists_), also dst = src (the params from the backups), chunk by chunk in the
// same pass.
std::tuple<at::Tensor, at::Tensor> norms_run(const Dtypes& dt, const Bases& x, double ord, const Plan& plan,
                                             const Bases& dst = {}, const Bases& src = {}) {
  const bool inf = std::isinf(ord);
  const size_t n = dt.size();
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor per = at::empty({static_cast<int64_t>(n)}, opts);
  at::Tensor total = at::empty({}, opts);

  std::vector<double> partial(plan.num_chunks());
  const KernelTable& k = kernels();
  const bool restore = !dst.empty();
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const at::ScalarType t = dt[ch.tensor];
    void* d = restore ? chunk_ptr(dst, t, ch) : nullptr;
    const void* s = restore ? chunk_ptr(src, t, ch) : nullptr;
    partial[c] = k.norm(t, chunk_ptr(x, t, ch), ch.size, inf, d, s);
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
  return norms_run(dtypes_of(tensors), bases_of(tensors), ord, plan_over(tensors));
}

// `accum`, `params`, `backups`: empty when not given.
at::Tensor grad_stats_run(const Dtypes& dt, const Bases& grads, const Bases& accum, const Bases& params,
                          const Bases& backups, double accum_weight, bool accum_init, double adaptive_eta,
                          const Plan& plan) {
  const size_t n = dt.size();
  const bool adaptive = adaptive_eta >= 0;
  const bool has_delta = !backups.empty();
  const bool need_params = adaptive || has_delta;
  at::Tensor out = at::empty({static_cast<int64_t>(n), 3}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));

  std::vector<double> partial(3 * plan.num_chunks());
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t c, const Chunk& ch) {
    const at::ScalarType t = dt[ch.tensor];
    StatsArgs a{};
    a.grad = chunk_ptr(grads, t, ch);
    a.accum = accum.empty() ? nullptr : chunk_ptr(accum, t, ch);
    a.param = need_params ? chunk_ptr(params, t, ch) : nullptr;
    a.backup = has_delta ? chunk_ptr(backups, t, ch) : nullptr;
    a.accum_weight = accum_weight;
    a.accum_init = accum_init;
    a.adaptive = adaptive;
    a.adaptive_eta = adaptive_eta;
    k.stats(t, a, ch.size, &partial[3 * c]);
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
  bump_versions(accum);
  return grad_stats_run(dtypes_of(grads), bases_of(grads), bases_of(accum), bases_of(params), bases_of(backups),
                        accum_weight, accum_init, adaptive_eta, plan_over(grads));
}

void ascent_step_run(const Dtypes& dt, const Bases& params, const Bases& grads, const Bases& backups,
                     const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm, bool first,
                     double adaptive_eta, bool zero_grads, const Plan& plan) {
  const at::Tensor step_c = step_coef.contiguous();
  const at::Tensor proj_c = proj.contiguous();
  const float* step_p = step_c.data_ptr<float>();
  const float* proj_p = proj_c.data_ptr<float>();
  const math::Norm nrm = norm == "l2" ? math::Norm::L2 : math::Norm::Linf;

  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::ScalarType t = dt[i];
    AscentArgs a{};
    a.param = chunk_ptr(params, t, ch);
    a.grad = chunk_ptr(grads, t, ch);
    a.backup = chunk_ptr(backups, t, ch);
    a.step = step_p[i];
    a.proj = proj_p[i];
    a.norm = nrm;
    a.first = first;
    a.adaptive = adaptive_eta >= 0;
    a.adaptive_eta = adaptive_eta;
    a.zero_grads = zero_grads;
    k.ascent(t, a, ch.size);
  });
}

void ascent_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& step_coef,
                     const at::Tensor& proj, c10::string_view norm, bool first, double adaptive_eta, bool zero_grads) {
  check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta, first, zero_grads);
  bump_versions(params);
  if (first) bump_versions(backups);
  if (zero_grads) bump_versions(grads);
  ascent_step_run(dtypes_of(params), bases_of(params), bases_of(grads), bases_of(backups), step_coef, proj, norm, first,
                  adaptive_eta, zero_grads, plan_over(params));
}

void restore_run(const Dtypes& dt, const Bases& params, const Bases& backups, const Plan& plan) {
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const at::ScalarType t = dt[ch.tensor];
    // Streaming copy for large chunks: a plain store would first read the destination line.
    k.copy(chunk_ptr(params, t, ch), chunk_ptr(backups, t, ch), ch.size * static_cast<int64_t>(c10::elementSize(t)));
  });
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_restore(params, backups);
  bump_versions(params);
  restore_run(dtypes_of(params), bases_of(params), bases_of(backups), plan_over(params));
}

void combine_grads_run(const Dtypes& dt, const Bases& grads, const Bases& accum, double weight, const Plan& plan) {
  const KernelTable& k = kernels();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const at::ScalarType t = dt[ch.tensor];
    k.combine(t, chunk_ptr(grads, t, ch), chunk_ptr(accum, t, ch), weight, ch.size);
  });
}

void combine_grads_cpu(at::TensorList grads, at::TensorList accum, double weight) {
  check_combine_grads(grads, accum, weight);
  bump_versions(grads);
  combine_grads_run(dtypes_of(grads), bases_of(grads), bases_of(accum), weight, plan_over(grads));
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

// The bump() masks: list k's tensors, and the .grad of the params. Each op reads every pointer it needs (which
// can still refuse a tensor) before it bumps a counter.
constexpr int64_t bit(size_t k) { return int64_t(1) << k; }
constexpr int64_t kParamGrads = int64_t(1) << (16 + kParams);

std::tuple<at::Tensor, at::Tensor> norms_lists(const Lists& h, double ord, bool of_grads) {
  check_norms_call(*h, ord, of_grads);
  const Bases x = of_grads ? h->grad_ptrs(kParams, kNorms) : h->data_ptrs(kParams);
  return norms_run(h->dtypes(kParams), x, ord, h->cpu_plan());
}

at::Tensor grad_stats_lists(const Lists& h, bool with_accum, bool with_params, bool with_backups, double accum_weight,
                            bool accum_init, double adaptive_eta) {
  check_grad_stats_call(*h, with_accum, with_params, with_backups, accum_weight, adaptive_eta);
  const Bases grads = h->grad_ptrs(kParams, kGradStats);
  const Bases accum = with_accum ? h->data_ptrs(kAccum) : Bases();
  const Bases params = with_params ? h->data_ptrs(kParams) : Bases();
  const Bases backups = with_backups ? h->data_ptrs(kBackups) : Bases();
  if (with_accum) h->bump(bit(kAccum));
  return grad_stats_run(h->dtypes(kParams), grads, accum, params, backups, accum_weight, accum_init, adaptive_eta,
                        h->cpu_plan());
}

void ascent_step_lists(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                       bool first, double adaptive_eta, bool zero_grads) {
  check_ascent_step_call(*h, step_coef, proj, norm, adaptive_eta);
  const Bases grads = h->grad_ptrs(kParams, kAscentStep);
  const Bases params = h->data_ptrs(kParams), backups = h->data_ptrs(kBackups);
  h->bump(bit(kParams) | (first ? bit(kBackups) : 0) | (zero_grads ? kParamGrads : 0));
  ascent_step_run(h->dtypes(kParams), params, grads, backups, step_coef, proj, norm, first, adaptive_eta, zero_grads,
                  h->cpu_plan());
}

std::tuple<at::Tensor, at::Tensor> restore_norms_lists(const Lists& h, double ord) {
  check_restore_norms_call(*h, ord);
  const Bases grads = h->grad_ptrs(kParams, kRestoreNorms);
  const Bases params = h->data_ptrs(kParams), backups = h->data_ptrs(kBackups);
  h->bump(bit(kParams));
  return norms_run(h->dtypes(kParams), grads, ord, h->cpu_plan(), params, backups);
}

void restore_lists(const Lists& h) {
  prepare_restore(*h);
  const Bases params = h->data_ptrs(kParams), backups = h->data_ptrs(kBackups);
  h->bump(bit(kParams));
  restore_run(h->dtypes(kParams), params, backups, h->cpu_plan());
}

void combine_grads_lists(const Lists& h, double weight) {
  check_combine_grads_call(*h, weight);
  const Bases grads = h->grad_ptrs(kParams, kCombineGrads);
  const Bases accum = h->data_ptrs(kAccum);
  h->bump(kParamGrads);
  combine_grads_run(h->dtypes(kParams), grads, accum, weight, h->cpu_plan());
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
