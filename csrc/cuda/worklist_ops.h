// The host code of the CUDA ops: the fused ops written once over the
// work list (fastperturb/worklist/plan.h, device.h) and an executor `Exec`
// that runs its launches:
//   * the CUDA launcher (csrc/cuda/ops.cpp) launches the kernels of
//     csrc/cuda/kernels.cu;
//   * the CPU executor of the test build (csrc/testing/worklist_executor.cpp)
//     walks the same launches block by block on CPU tensors, so the tests
//     execute this host code.
// It needs ATen, so it lives here with its users rather than among the
// dependency-free headers of csrc/include/.
//
// An Exec provides:
//   Limits limits(int depth) const;          // chunk size and launch capacities
//   int finalize_tensors() const;            // tensors per finalize launch
//   template <class Op>
//   void run(const LaunchArgs<Op::kDepth>&, const Op&, double* partials);
//   template <class F>
//   void finalize(const FinalizeArgs&, const F&);
//
// The arguments are checked by the caller (csrc/common/checks.h) before this
// runs; the ops bump the version counters of what they write (common/versions.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/versions.h"
#include "fastperturb/worklist/device.h"
#include "fastperturb/worklist/plan.h"

namespace fastperturb {
namespace worklist {

template <class F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default:
      TORCH_CHECK_TYPE(false, "fastperturb: unsupported dtype ", st,
                       "; supported: float16, bfloat16, float32, float64");
  }
}

// Plans the launches over `primary` (the list every other list mirrors),
// grouping the tensors by dtype.
template <class Exec>
Plan plan_list(const Exec& ex, at::TensorList primary, int depth) {
  std::vector<int64_t> numels;
  std::vector<int> keys;
  numels.reserve(primary.size());
  keys.reserve(primary.size());
  for (const at::Tensor& t : primary) {
    numels.push_back(t.numel());
    keys.push_back(static_cast<int>(t.scalar_type()));
  }
  return make_plan(numels, keys, ex.limits(depth), depth);
}

// Runs every launch of `plan` over the parallel `lists` (an empty list is
// absent: its pointers are null). make_op(T{}) builds the op for dtype T.
template <int D, class Exec, class MakeOp>
void run_plan(Exec& ex, const Plan& plan, const std::array<at::TensorList, D>& lists, MakeOp&& make_op,
              double* partials) {
  const at::TensorList primary = lists[0];
  for (const PlannedLaunch& l : plan.launches) {
    const at::ScalarType st = primary[static_cast<std::size_t>(plan.groups[l.group].front())].scalar_type();
    dispatch_float(st, [&](auto tag) {
      using T = decltype(tag);
      const auto op = make_op(T{});
      static_assert(std::decay_t<decltype(op)>::kDepth == D, "op depth and list count differ");
      const LaunchArgs<D> args = fill_launch<D>(plan, l, [&](int d, int32_t i) -> void* {
        const at::TensorList list = lists[static_cast<std::size_t>(d)];
        return list.empty() ? nullptr : list[static_cast<std::size_t>(i)].data_ptr();
      });
      ex.run(args, op, partials);
    });
  }
}

inline at::TensorOptions f32_on(at::TensorList l) {
  return at::TensorOptions().dtype(at::kFloat).device(l.empty() ? at::Device(at::kCPU) : l[0].device());
}

// The five core ops below take their plan: the list ops plan every call (plan_list), the ops on a TensorLists
// handle reuse the handle's (worklist_list_ops.h). A plan is made for one list of numels and dtypes and one
// depth; every list an op reads mirrors the first.

// norms of `tensors`; with `params` and `backups` also params = backups in the same pass (restore_norms_lists_).
template <class Exec>
std::tuple<at::Tensor, at::Tensor> norms(Exec& ex, const Plan& plan, at::TensorList tensors, double ord,
                                         at::TensorList params = {}, at::TensorList backups = {}) {
  const math::Norm norm = ord == 2.0 ? math::Norm::L2 : math::Norm::Linf;
  const bool restoring = !params.empty();
  if (restoring) bump_versions(params);
  const auto f32 = f32_on(tensors);
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (n == 0) return {at::zeros({0}, f32), at::zeros({}, f32)};
  const auto f64 = f32.dtype(at::kDouble);
  at::Tensor partials = at::empty({plan.total_slots > 0 ? plan.total_slots : 1}, f64);
  at::Tensor acc = at::empty({n}, f64);
  at::Tensor per = at::empty({n}, f32);
  at::Tensor total = at::empty({}, f32);
  if (restoring)
    run_plan<3>(
        ex, plan, {tensors, params, backups}, [&](auto tag) { return RestoreNormsOp<decltype(tag)>{{norm}}; },
        partials.data_ptr<double>());
  else
    run_plan<1>(
        ex, plan, {tensors}, [&](auto tag) { return NormsOp<decltype(tag)>{norm}; }, partials.data_ptr<double>());
  const FinalizeNorm per_tensor{partials.data_ptr<double>(), acc.data_ptr<double>(), per.data_ptr<float>(), norm};
  for (const FinalizeArgs& f : plan_finalize(plan, ex.finalize_tensors())) ex.finalize(f, per_tensor);
  ex.finalize(single_finalize(n), FinalizeNorm{acc.data_ptr<double>(), nullptr, total.data_ptr<float>(), norm});
  return {per, total};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> norms(Exec& ex, at::TensorList tensors, double ord) {
  return norms(ex, plan_list(ex, tensors, 1), tensors, ord);
}

template <class Exec>
at::Tensor grad_stats(Exec& ex, const Plan& plan, at::TensorList grads, at::TensorList accum, at::TensorList params,
                      at::TensorList backups, double accum_weight, bool accum_init, double adaptive_eta) {
  const auto f32 = f32_on(grads);
  const int64_t n = static_cast<int64_t>(grads.size());
  bump_versions(accum);
  if (n == 0) return at::zeros({0, 3}, f32);
  at::Tensor partials = at::empty({3 * (plan.total_slots > 0 ? plan.total_slots : 1)}, f32.dtype(at::kDouble));
  at::Tensor out = at::empty({n, 3}, f32);
  run_plan<4>(
      ex, plan, {grads, accum, params, backups},
      [&](auto tag) {
        using T = decltype(tag);
        using C = math::compute_t<T>;
        return StatsOp<T>{static_cast<C>(accum_weight),
                          static_cast<C>(adaptive_eta),
                          accum_init,
                          !accum.empty(),
                          !params.empty(),
                          !backups.empty(),
                          adaptive_eta >= 0};
      },
      partials.data_ptr<double>());
  const FinalizeStats fin{partials.data_ptr<double>(), out.data_ptr<float>()};
  for (const FinalizeArgs& f : plan_finalize(plan, ex.finalize_tensors())) ex.finalize(f, fin);
  return out;
}

template <class Exec>
at::Tensor grad_stats(Exec& ex, at::TensorList grads, at::TensorList accum, at::TensorList params,
                      at::TensorList backups, double accum_weight, bool accum_init, double adaptive_eta) {
  return grad_stats(ex, plan_list(ex, grads, 4), grads, accum, params, backups, accum_weight, accum_init, adaptive_eta);
}

template <class Exec>
void ascent_step(Exec& ex, const Plan& plan, at::TensorList params, at::TensorList grads, at::TensorList backups,
                 const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm_name, bool first,
                 double adaptive_eta, bool zero_grads) {
  bump_versions(params);
  if (first) bump_versions(backups);
  if (zero_grads) bump_versions(grads);
  if (params.empty()) return;
  const math::Norm norm = norm_name == "l2" ? math::Norm::L2 : math::Norm::Linf;
  // The kernels index the coefficients as flat arrays.
  const at::Tensor step = step_coef.contiguous();
  const at::Tensor radius = proj.contiguous();
  const float* step_ptr = step.data_ptr<float>();
  const float* proj_ptr = radius.data_ptr<float>();
  run_plan<3>(
      ex, plan, {params, grads, backups},
      [&](auto tag) {
        using T = decltype(tag);
        using C = math::compute_t<T>;
        // On or off is decided here, in double, as the CPU kernels and the reference decide it: an off value in
        // [-2^-150, 0) rounds to -0.0 in float, which the element's `adaptive_eta >= 0` would take as on.
        const C eta = adaptive_eta >= 0 ? static_cast<C>(adaptive_eta) : C(-1);
        return AscentOp<T>{step_ptr, proj_ptr, eta, norm, first, zero_grads};
      },
      nullptr);
}

template <class Exec>
void ascent_step(Exec& ex, at::TensorList params, at::TensorList grads, at::TensorList backups,
                 const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm_name, bool first,
                 double adaptive_eta, bool zero_grads) {
  ascent_step(ex, plan_list(ex, params, 3), params, grads, backups, step_coef, proj, norm_name, first, adaptive_eta,
              zero_grads);
}

template <class Exec>
void restore(Exec& ex, const Plan& plan, at::TensorList params, at::TensorList backups) {
  bump_versions(params);
  if (params.empty()) return;
  run_plan<2>(ex, plan, {params, backups}, [](auto tag) { return RestoreOp<decltype(tag)>{}; }, nullptr);
}

template <class Exec>
void restore(Exec& ex, at::TensorList params, at::TensorList backups) {
  restore(ex, plan_list(ex, params, 2), params, backups);
}

template <class Exec>
void combine_grads(Exec& ex, const Plan& plan, at::TensorList grads, at::TensorList accum, double weight) {
  bump_versions(grads);
  if (grads.empty()) return;
  run_plan<2>(
      ex, plan, {grads, accum},
      [&](auto tag) {
        using T = decltype(tag);
        return CombineOp<T>{static_cast<math::compute_t<T>>(weight)};
      },
      nullptr);
}

template <class Exec>
void combine_grads(Exec& ex, at::TensorList grads, at::TensorList accum, double weight) {
  combine_grads(ex, plan_list(ex, grads, 2), grads, accum, weight);
}

// The SAM-family ops.

template <class Exec>
at::Tensor dot_stats(Exec& ex, at::TensorList x, at::TensorList y) {
  const auto f32 = f32_on(x);
  const int64_t n = static_cast<int64_t>(x.size());
  if (n == 0) return at::zeros({0, 3}, f32);
  const Plan plan = plan_list(ex, x, 2);
  at::Tensor partials = at::empty({3 * (plan.total_slots > 0 ? plan.total_slots : 1)}, f32.dtype(at::kDouble));
  at::Tensor out = at::empty({n, 3}, f32);
  run_plan<2>(ex, plan, {x, y}, [](auto tag) { return DotOp<decltype(tag)>{}; }, partials.data_ptr<double>());
  const FinalizeStats fin{partials.data_ptr<double>(), out.data_ptr<float>()};
  for (const FinalizeArgs& f : plan_finalize(plan, ex.finalize_tensors())) ex.finalize(f, fin);
  return out;
}

// Runs a one-slot op over (lists) and sums each tensor's partials into a float32 [n].
template <int D, class Exec, class MakeOp>
at::Tensor run_with_sums(Exec& ex, const std::array<at::TensorList, D>& lists, MakeOp&& make_op) {
  const auto f32 = f32_on(lists[0]);
  const int64_t n = static_cast<int64_t>(lists[0].size());
  if (n == 0) return at::zeros({0}, f32);
  const Plan plan = plan_list(ex, lists[0], D);
  at::Tensor partials = at::empty({plan.total_slots > 0 ? plan.total_slots : 1}, f32.dtype(at::kDouble));
  at::Tensor out = at::empty({n}, f32);
  run_plan<D>(ex, plan, lists, make_op, partials.data_ptr<double>());
  const FinalizeSum fin{partials.data_ptr<double>(), out.data_ptr<float>()};
  for (const FinalizeArgs& f : plan_finalize(plan, ex.finalize_tensors())) ex.finalize(f, fin);
  return out;
}

template <class Exec>
at::Tensor lincomb(Exec& ex, at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coef) {
  bump_versions(out);
  // The kernels index the coefficients as a flat [n, 3] array, read on the device (no host sync).
  const at::Tensor coef_c = coef.contiguous();
  const float* coef_ptr = coef_c.data_ptr<float>();
  const bool has_y = !y.empty();
  return run_with_sums<3>(ex, {out, x, y}, [&](auto tag) { return LincombOp<decltype(tag)>{coef_ptr, has_y}; });
}

template <class Exec>
at::Tensor ema_residual(Exec& ex, at::TensorList grads, at::TensorList ema, at::TensorList params, double sigma,
                        double lmbda, bool init, double grad_scale, double adaptive_eta) {
  bump_versions(grads);
  bump_versions(ema);
  const bool adaptive = adaptive_eta >= 0;
  return run_with_sums<3>(ex, {grads, ema, params}, [&](auto tag) {
    using C = math::compute_t<decltype(tag)>;
    const math::EmaCoefs<C> k{static_cast<C>(grad_scale), static_cast<C>(sigma), static_cast<C>(lmbda),
                              static_cast<C>(1.0 - lmbda), init};
    return EmaOp<decltype(tag)>{k, static_cast<C>(adaptive_eta), adaptive};
  });
}

}  // namespace worklist
}  // namespace fastperturb
