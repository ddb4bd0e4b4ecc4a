// The ops on a TensorLists handle over the CUDA work list: the host code of the CUDA kernels' handle ops
// (cuda/ops.cpp) and of the test build's CPU executor (testing/worklist_executor.cpp), as worklist_ops.h is for
// the list ops. The call's checks are the CPU kernels' (common/list_calls.h); the plan is the handle's
// (TensorLists::worklist_plan: built on the first call of each depth, then only the tensors' pointers are
// written into each launch's arguments). The results equal the list ops' of worklist_ops.h on the same tensors,
// bit for bit (the same plan and kernels); restore_norms_lists_ is restore_ and norms of the gradients in one
// pass (RestoreNormsOp), whose norms are NormsOp's bit for bit only where the three lists share the vector path's
// alignment (see RestoreNormsOp).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <tuple>
#include <vector>

#include "common/list_calls.h"
#include "cuda/worklist_ops.h"

namespace fastperturb {
namespace worklist {

// The handle's plan for `depth` lists: plan_list over its params, made once per depth and executor geometry.
template <class Exec>
std::shared_ptr<const Plan> plan_of(const Exec& ex, const TensorLists& h, int depth) {
  return h.worklist_plan(depth, ex.limits(depth), [&] { return plan_list(ex, h.list(list_calls::kParams), depth); });
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> norms_lists(Exec& ex, const TensorLists& h, double ord, bool of_grads) {
  const std::vector<at::Tensor> grads = list_calls::prepare_norms(h, ord, of_grads);
  return norms(ex, *plan_of(ex, h, 1), list_calls::norms_input(h, of_grads, grads), ord);
}

template <class Exec>
at::Tensor grad_stats_lists(Exec& ex, const TensorLists& h, bool with_accum, bool with_params, bool with_backups,
                            double accum_weight, bool accum_init, double adaptive_eta) {
  using namespace list_calls;
  const std::vector<at::Tensor> grads =
      prepare_grad_stats(h, with_accum, with_params, with_backups, accum_weight, adaptive_eta);
  return grad_stats(ex, *plan_of(ex, h, 4), grads, with_accum ? h.list(kAccum) : at::TensorList(),
                    with_params ? h.list(kParams) : at::TensorList(),
                    with_backups ? h.list(kBackups) : at::TensorList(), accum_weight, accum_init, adaptive_eta);
}

template <class Exec>
void ascent_step_lists(Exec& ex, const TensorLists& h, const at::Tensor& step_coef, const at::Tensor& proj,
                       c10::string_view norm, bool first, double adaptive_eta, bool zero_grads) {
  using namespace list_calls;
  const std::vector<at::Tensor> grads = prepare_ascent_step(h, step_coef, proj, norm, adaptive_eta);
  ascent_step(ex, *plan_of(ex, h, 3), h.list(kParams), grads, h.list(kBackups), step_coef, proj, norm, first,
              adaptive_eta, zero_grads);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> restore_norms_lists(Exec& ex, const TensorLists& h, double ord) {
  using namespace list_calls;
  const std::vector<at::Tensor> grads = prepare_restore_norms(h, ord);
  return norms(ex, *plan_of(ex, h, 3), grads, ord, h.list(kParams), h.list(kBackups));
}

template <class Exec>
void restore_lists(Exec& ex, const TensorLists& h) {
  using namespace list_calls;
  prepare_restore(h);
  restore(ex, *plan_of(ex, h, 2), h.list(kParams), h.list(kBackups));
}

template <class Exec>
void combine_grads_lists(Exec& ex, const TensorLists& h, double weight) {
  using namespace list_calls;
  const std::vector<at::Tensor> grads = prepare_combine_grads(h, weight);
  combine_grads(ex, *plan_of(ex, h, 2), grads, h.list(kAccum), weight);
}

}  // namespace worklist
}  // namespace fastperturb
