// The checks of the ops on a TensorLists handle (schemas: fastperturb/list_schemas.h), written once for every
// backend that runs them: the CPU kernels (cpu/ops.cpp) and the CUDA work list (cuda/worklist_list_ops.h, also
// run on CPU tensors by the test build's executor). The handle was validated when it was built; a call checks
// its own arguments, that the handle has the lists it reads and that they are current (their fingerprint), and
// the params' .grad it reads. Everything is checked before anything is written: a refused call changes nothing.
// check_<op>_call() runs an op's checks but the gradients'; prepare_<op>() adds them and returns the gradients as
// tensors (the CUDA work list). The CPU kernels take them as data pointers instead (TensorLists::grad_ptrs, with
// the same checks), so no tensor is copied per call.
// Which device a handle's tensors are on is the caller's check (tensor_lists.cpp routes by it).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/tensor_lists.h"

namespace fastperturb {
namespace list_calls {

// The handle's lists by role.
constexpr size_t kParams = 0, kBackups = 1, kAccum = 2;

// The handle has the `wanted` lists, and the lists the op reads (`used`) are current.
inline void check_lists(const char* op, const TensorLists& h, std::initializer_list<size_t> wanted,
                        std::initializer_list<size_t> used) {
  for (size_t k : wanted)
    TORCH_CHECK_VALUE(h.has(k), op, ": the TensorLists handle has no ", k == kBackups ? "backups" : "accum",
                      " list; build it with one");
  h.check(op, used);
}

inline void check_ord(double ord) {
  TORCH_CHECK_VALUE(ord == 2.0 || ord == INFINITY, "ord must be 2 or inf, got ", checks::float_str(ord));
}

// norms_lists: with of_grads the params' .grad (checked against the params' fingerprint by grads_of; same
// numels, so the same plan), else nothing: the norms are then the params' (norms_input).
inline constexpr const char* kNorms = "norms_lists";
inline void check_norms_call(const TensorLists& h, double ord, bool of_grads) {
  check_ord(ord);
  if (!of_grads) check_lists(kNorms, h, {}, {kParams});
}
inline std::vector<at::Tensor> prepare_norms(const TensorLists& h, double ord, bool of_grads) {
  check_norms_call(h, ord, of_grads);
  return of_grads ? h.grads_of(kParams, kNorms) : std::vector<at::Tensor>{};
}
inline at::TensorList norms_input(const TensorLists& h, bool of_grads, const std::vector<at::Tensor>& grads) {
  return of_grads ? at::TensorList(grads) : h.list(kParams);
}

// grad_stats_lists_: the gradients (the lists the flags ask for are the handle's).
inline constexpr const char* kGradStats = "grad_stats_lists_";
inline void check_grad_stats_call(const TensorLists& h, bool with_accum, bool with_params, bool with_backups,
                                  double accum_weight, double adaptive_eta) {
  const char* op = kGradStats;
  TORCH_CHECK_VALUE(!with_backups || with_params,
                    "backups given without params: the perturbation d = params - backups needs both");
  TORCH_CHECK_VALUE(!(adaptive_eta >= 0) || h.size() == 0 || with_params,
                    "adaptive_eta >= 0 needs params (the adaptive scale is |params| + eta)");
  checks::check_finite("accum_weight", accum_weight);
  checks::check_finite("adaptive_eta", adaptive_eta);
  // The gradients are checked against the params' fingerprint (grads_of), so the params need checking only when
  // read.
  if (with_accum) check_lists(op, h, {kAccum}, {kAccum});
  if (with_params) check_lists(op, h, {}, {kParams});
  if (with_backups) check_lists(op, h, {kBackups}, {kBackups});
}
inline std::vector<at::Tensor> prepare_grad_stats(const TensorLists& h, bool with_accum, bool with_params,
                                                  bool with_backups, double accum_weight, double adaptive_eta) {
  check_grad_stats_call(h, with_accum, with_params, with_backups, accum_weight, adaptive_eta);
  return h.grads_of(kParams, kGradStats);
}

// ascent_step_lists_: the gradients.
inline constexpr const char* kAscentStep = "ascent_step_lists_";
inline void check_ascent_step_call(const TensorLists& h, const at::Tensor& step_coef, const at::Tensor& proj,
                                   c10::string_view norm, double adaptive_eta) {
  const char* op = kAscentStep;
  check_lists(op, h, {kBackups}, {kParams, kBackups});
  const at::TensorList params = h.list(kParams);
  checks::check_coef("step_coef", step_coef, params.size(), params);
  checks::check_coef("proj", proj, params.size(), params);
  TORCH_CHECK_VALUE(norm == "l2" || norm == "linf", "norm must be 'l2' or 'linf', got '", std::string(norm), "'");
  checks::check_finite("adaptive_eta", adaptive_eta);
}
inline std::vector<at::Tensor> prepare_ascent_step(const TensorLists& h, const at::Tensor& step_coef,
                                                   const at::Tensor& proj, c10::string_view norm, double adaptive_eta) {
  check_ascent_step_call(h, step_coef, proj, norm, adaptive_eta);
  return h.grads_of(kParams, kAscentStep);
}

// restore_norms_lists_: the gradients, every one checked before a weight is written.
inline constexpr const char* kRestoreNorms = "restore_norms_lists_";
inline void check_restore_norms_call(const TensorLists& h, double ord) {
  check_ord(ord);
  check_lists(kRestoreNorms, h, {kBackups}, {kParams, kBackups});
}
inline std::vector<at::Tensor> prepare_restore_norms(const TensorLists& h, double ord) {
  check_restore_norms_call(h, ord);
  return h.grads_of(kParams, kRestoreNorms);
}

inline void prepare_restore(const TensorLists& h) { check_lists("restore_lists_", h, {kBackups}, {kParams, kBackups}); }

// combine_grads_lists_: the gradients.
inline constexpr const char* kCombineGrads = "combine_grads_lists_";
inline void check_combine_grads_call(const TensorLists& h, double weight) {
  checks::check_finite("weight", weight);
  check_lists(kCombineGrads, h, {kAccum}, {kAccum});
}
inline std::vector<at::Tensor> prepare_combine_grads(const TensorLists& h, double weight) {
  check_combine_grads_call(h, weight);
  return h.grads_of(kParams, kCombineGrads);
}

}  // namespace list_calls
}  // namespace fastperturb
