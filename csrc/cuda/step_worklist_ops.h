// The host code of the fused restore + base-optimizer steps over the work list, written once for the
// CUDA launcher (csrc/cuda/step_ops.cpp) and the CPU executor of the test build
// (csrc/testing/worklist_executor.cpp), as cuda/worklist_ops.h does for the other ops. The arguments
// are checked by the caller (common/checks.h).
#pragma once

#include <ATen/ATen.h>

#include "common/versions.h"
#include "cuda/worklist_ops.h"
#include "fastperturb/worklist/step_ops.h"

namespace fastperturb {
namespace worklist {

template <class Exec>
void sgd_step(Exec& ex, at::TensorList params, at::TensorList backups, at::TensorList grads,
              at::TensorList momentum_buffers, double lr, double weight_decay, double momentum, double dampening,
              bool nesterov, bool maximize, bool init_momentum) {
  bump_versions(params);
  bump_versions(momentum_buffers);
  if (params.empty()) return;
  const Plan plan = plan_list(ex, params, 4);
  run_plan<4>(
      ex, plan, {params, backups, grads, momentum_buffers},
      [&](auto tag) {
        using T = decltype(tag);
        return SgdStepOp<T>{step_math::sgd_coefs<compute_t<T>>(lr, weight_decay, momentum, dampening, nesterov,
                                                               maximize, init_momentum)};
      },
      nullptr);
}

template <class Exec>
void adam_step(Exec& ex, at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, double lr, double beta1, double beta2,
               double eps, double step, double weight_decay, bool decoupled_weight_decay, bool maximize) {
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(max_exp_avg_sqs);
  if (params.empty()) return;
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const Plan plan = plan_list(ex, params, 6);
  run_plan<6>(
      ex, plan, {params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
      [&](auto tag) {
        using T = decltype(tag);
        return AdamStepOp<T>{step_math::adam_coefs<compute_t<T>>(lr, beta1, beta2, eps, step, weight_decay,
                                                                 decoupled_weight_decay, maximize, amsgrad)};
      },
      nullptr);
}

}  // namespace worklist
}  // namespace fastperturb
