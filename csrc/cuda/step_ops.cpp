// The CUDA implementations of the fused restore + base-optimizer steps: TORCH_LIBRARY_IMPL(fastperturb,
// CUDA) for restore_sgd_step_ and restore_adam_step_. The host code is cuda/step_worklist_ops.h, shared
// with the CPU work-list executor of the test build; this file only checks the arguments and turns each
// planned launch into a kernel launch on the current stream (step_kernels.cu). No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/step_launch.h"
#include "cuda/step_worklist_ops.h"

namespace fastperturb {
namespace cuda {
namespace {

using worklist::FinalizeArgs;
using worklist::LaunchArgs;
using worklist::Limits;

struct StepExec {
  cudaStream_t stream;

  Limits limits(int depth) const {
    Limits l;
    l.chunk_size = worklist::kChunkSize;
    l.max_tensors = worklist::max_tensors_for_depth(depth);
    l.max_blocks = worklist::kMaxBlocks;
    return l;
  }
  int finalize_tensors() const { return worklist::kFinalizeTensors; }

  template <class Op>
  void run(const LaunchArgs<Op::kDepth>& a, const Op& op, double*) const {
    launch_step(a, op, stream);
  }
};

StepExec exec_for(const char* name, at::TensorList list) {
  const at::Device d = list[0].device();
  TORCH_CHECK_VALUE(d.is_cuda(), "fastperturb's CUDA kernels got ", name, "[0] on ", d,
                    "; pass CUDA tensors (or use the CPU kernels for CPU tensors)");
  return StepExec{c10::cuda::getCurrentCUDAStream(d.index()).stream()};
}

void restore_sgd_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList momentum_buffers, double lr, double weight_decay, double momentum,
                           double dampening, bool nesterov, bool maximize, bool init_momentum) {
  checks::check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening);
  if (params.empty()) return;
  StepExec ex = exec_for("params", params);  // (checks the device before the guard, which needs a CUDA one)
  const c10::cuda::CUDAGuard guard(params[0].device());
  worklist::sgd_step(ex, params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
                     maximize, init_momentum);
}

void restore_adam_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            double lr, double beta1, double beta2, double eps, double step, double weight_decay,
                            bool decoupled_weight_decay, bool maximize) {
  checks::check_restore_adam_step(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                                  step, weight_decay);
  if (params.empty()) return;
  StepExec ex = exec_for("params", params);  // (checks the device before the guard, which needs a CUDA one)
  const c10::cuda::CUDAGuard guard(params[0].device());
  worklist::adam_step(ex, params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, step,
                      weight_decay, decoupled_weight_decay, maximize);
}

}  // namespace
}  // namespace cuda
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CUDA, m) {
  m.impl("restore_sgd_step_", &fastperturb::cuda::restore_sgd_step_cuda);
  m.impl("restore_adam_step_", &fastperturb::cuda::restore_adam_step_cuda);
}
