// The CPU implementations of the fused restore + base-optimizer steps (schemas in
// csrc/include/fastperturb/schemas.h, semantics in fastperturb/ops/reference.py). As the other ops
// (ops.cpp): check every argument before writing, one chunk plan over the list (plan.h), the per-chunk
// kernels (step_kernels.h) in one parallel region. Element-wise only: no reduction, so any chunking
// gives the same bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>

#include "common/checks.h"
#include "common/versions.h"
#include "cpu/op_common.h"
#include "cpu/plan.h"
#include "cpu/step_kernels.h"

namespace fastperturb {
namespace cpu {
namespace {

void restore_sgd_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                          at::TensorList momentum_buffers, double lr, double weight_decay, double momentum,
                          double dampening, bool nesterov, bool maximize, bool init_momentum) {
  checks::check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening);
  bump_versions(params);
  bump_versions(momentum_buffers);
  const Plan plan = plan_over(params);
  const StepKernelTable& k = step_kernels();
  const bool has_buf = !momentum_buffers.empty();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::Tensor& w = params[i];
    SgdStepArgs a{};
    a.param = elem_ptr(w, ch.begin);
    a.backup = elem_ptr(backups[i], ch.begin);
    a.grad = elem_ptr(grads[i], ch.begin);
    a.momentum = has_buf ? elem_ptr(momentum_buffers[i], ch.begin) : nullptr;
    a.lr = lr;
    a.weight_decay = weight_decay;
    a.momentum_coef = momentum;
    a.dampening = dampening;
    a.nesterov = nesterov;
    a.maximize = maximize;
    a.init_momentum = init_momentum;
    k.sgd(w.scalar_type(), a, ch.size);
  });
}

void restore_adam_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, double lr, double beta1,
                           double beta2, double eps, double step, double weight_decay, bool decoupled_weight_decay,
                           bool maximize) {
  checks::check_restore_adam_step(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                                  step, weight_decay);
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(max_exp_avg_sqs);
  const Plan plan = plan_over(params);
  const StepKernelTable& k = step_kernels();
  const bool amsgrad = !max_exp_avg_sqs.empty();
  plan.for_each_chunk([&](int64_t, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const at::Tensor& w = params[i];
    AdamStepArgs a{};
    a.param = elem_ptr(w, ch.begin);
    a.backup = elem_ptr(backups[i], ch.begin);
    a.grad = elem_ptr(grads[i], ch.begin);
    a.exp_avg = elem_ptr(exp_avgs[i], ch.begin);
    a.exp_avg_sq = elem_ptr(exp_avg_sqs[i], ch.begin);
    a.max_exp_avg_sq = amsgrad ? elem_ptr(max_exp_avg_sqs[i], ch.begin) : nullptr;
    a.lr = lr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.step = step;
    a.weight_decay = weight_decay;
    a.decoupled = decoupled_weight_decay;
    a.maximize = maximize;
    k.adam(w.scalar_type(), a, ch.size);
  });
}

void restore_sgd_step_any(at::TensorList params, at::TensorList backups, at::TensorList grads,
                          at::TensorList momentum_buffers, double lr, double weight_decay, double momentum,
                          double dampening, bool nesterov, bool maximize, bool init_momentum) {
  require_cpu("restore_sgd_step_", {params, backups, grads, momentum_buffers});
  restore_sgd_step_cpu(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
                       maximize, init_momentum);
}

void restore_adam_step_any(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, double lr, double beta1,
                           double beta2, double eps, double step, double weight_decay, bool decoupled_weight_decay,
                           bool maximize) {
  require_cpu("restore_adam_step_", {params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  restore_adam_step_cpu(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, step,
                        weight_decay, decoupled_weight_decay, maximize);
}

void register_step_impls(torch::Library& m) {
  m.impl("restore_sgd_step_", &restore_sgd_step_cpu);
  m.impl("restore_adam_step_", &restore_adam_step_cpu);
}

}  // namespace
}  // namespace cpu
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CPU, m) { fastperturb::cpu::register_step_impls(m); }

TORCH_LIBRARY_IMPL(fastperturb, CompositeExplicitAutograd, m) {
  m.impl("restore_sgd_step_", &fastperturb::cpu::restore_sgd_step_any);
  m.impl("restore_adam_step_", &fastperturb::cpu::restore_adam_step_any);
}

// Sparse and MKL-DNN tensors: the checks reject them with the TypeError every backend raises.
TORCH_LIBRARY_IMPL(fastperturb, SparseCPU, m) { fastperturb::cpu::register_step_impls(m); }
TORCH_LIBRARY_IMPL(fastperturb, SparseCsrCPU, m) { fastperturb::cpu::register_step_impls(m); }
TORCH_LIBRARY_IMPL(fastperturb, MkldnnCPU, m) { fastperturb::cpu::register_step_impls(m); }
