// The CUDA implementations of the fastperturb ops: TORCH_LIBRARY_IMPL(fastperturb,
// CUDA). The host code is shared with the CPU work-list executor of the test
// build (cuda/worklist_ops.h): the same checks (common/checks.h), the same plan,
// kernel arguments and version-counter bumps; CudaExec only turns each planned launch into a kernel launch
// on the current stream (kernels.cu). The ops on a TensorLists handle run the same host code with the handle's
// cached plan (cuda/worklist_list_ops.h). No host synchronisation: the per-tensor
// coefficients are read on the device, the results stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "common/handle_kernels.h"
#include "cuda/launch.h"
#include "cuda/worklist_list_ops.h"
#include "cuda/worklist_ops.h"
#include "fastperturb/worklist/launch_args.h"
#include "fastperturb/worklist/plan.h"

namespace fastperturb {
namespace cuda {
namespace {

using worklist::FinalizeArgs;
using worklist::LaunchArgs;
using worklist::Limits;

struct CudaExec {
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
  void run(const LaunchArgs<Op::kDepth>& a, const Op& op, double* partials) const {
    launch_main(a, op, partials, stream);
  }
  template <class F>
  void finalize(const FinalizeArgs& f, const F& fin) const {
    launch_finalize(f, fin, stream);
  }
};

// The device every list is on (checked equal), which must be a CUDA device.
at::Device device_of(const char* name, at::TensorList list) {
  TORCH_CHECK_VALUE(!list.empty(), "fastperturb CUDA ops need at least one tensor in ", name);
  const at::Device d = list[0].device();
  TORCH_CHECK_VALUE(d.is_cuda(), "fastperturb's CUDA kernels got ", name, "[0] on ", d,
                    "; pass CUDA tensors (or use the CPU kernels for CPU tensors)");
  return d;
}

CudaExec exec_on(at::Device d) { return CudaExec{c10::cuda::getCurrentCUDAStream(d.index()).stream()}; }

std::tuple<at::Tensor, at::Tensor> norms_cuda(at::TensorList tensors, double ord) {
  checks::check_norms(tensors, ord);
  const at::Device d = device_of("tensors", tensors);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  return worklist::norms(ex, tensors, ord);
}

at::Tensor grad_stats_cuda(at::TensorList grads, at::TensorList accum, at::TensorList params, at::TensorList backups,
                           double accum_weight, bool accum_init, double adaptive_eta) {
  checks::check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta);
  const at::Device d = device_of("grads", grads);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  return worklist::grad_stats(ex, grads, accum, params, backups, accum_weight, accum_init, adaptive_eta);
}

void ascent_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& step_coef,
                      const at::Tensor& proj, c10::string_view norm, bool first, double adaptive_eta, bool zero_grads) {
  checks::check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta, first, zero_grads);
  // All lists empty: nothing to do (docs/design.md §3.2), as on the CPU. The dispatcher sends such a call here when
  // the coefficients are CUDA tensors; device_of would refuse it.
  if (params.empty()) return;
  const at::Device d = device_of("params", params);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  worklist::ascent_step(ex, params, grads, backups, step_coef, proj, norm, first, adaptive_eta, zero_grads);
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  checks::check_restore(params, backups);
  const at::Device d = device_of("params", params);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  worklist::restore(ex, params, backups);
}

void combine_grads_cuda(at::TensorList grads, at::TensorList accum, double weight) {
  checks::check_combine_grads(grads, accum, weight);
  const at::Device d = device_of("grads", grads);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  worklist::combine_grads(ex, grads, accum, weight);
}

at::Tensor dot_stats_cuda(at::TensorList x, at::TensorList y) {
  checks::check_dot_stats(x, y);
  const at::Device d = device_of("x", x);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  return worklist::dot_stats(ex, x, y);
}

at::Tensor lincomb_cuda(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coef) {
  checks::check_lincomb(out, x, y, coef);
  // Nothing to write: a CPU float32 [0], as the reference and the fake implementation return for empty lists
  // (the call reaches this kernel only through coef's device).
  if (out.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  const at::Device d = device_of("out", out);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  return worklist::lincomb(ex, out, x, y, coef);
}

at::Tensor ema_residual_cuda(at::TensorList grads, at::TensorList ema, at::TensorList params, double sigma,
                             double lmbda, bool init, double grad_scale, double adaptive_eta) {
  checks::check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta);
  const at::Device d = device_of("grads", grads);
  const c10::cuda::CUDAGuard guard(d);
  CudaExec ex = exec_on(d);
  return worklist::ema_residual(ex, grads, ema, params, sigma, lmbda, init, grad_scale, adaptive_eta);
}

// ---- the ops on a TensorLists handle (common/handle_kernels.h; host code: cuda/worklist_list_ops.h) ----------
// Reached for handles whose tensors are on a CUDA device (tensor_lists.cpp routes by it).

CudaExec exec_for(const Lists& h) { return exec_on(h->device()); }

std::tuple<at::Tensor, at::Tensor> norms_lists_cuda(const Lists& h, double ord, bool of_grads) {
  const c10::cuda::CUDAGuard guard(h->device());
  CudaExec ex = exec_for(h);
  return worklist::norms_lists(ex, *h, ord, of_grads);
}

at::Tensor grad_stats_lists_cuda(const Lists& h, bool with_accum, bool with_params, bool with_backups,
                                 double accum_weight, bool accum_init, double adaptive_eta) {
  const c10::cuda::CUDAGuard guard(h->device());
  CudaExec ex = exec_for(h);
  return worklist::grad_stats_lists(ex, *h, with_accum, with_params, with_backups, accum_weight, accum_init,
                                    adaptive_eta);
}

void ascent_step_lists_cuda(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                            bool first, double adaptive_eta, bool zero_grads) {
  const c10::cuda::CUDAGuard guard(h->device());
  CudaExec ex = exec_for(h);
  worklist::ascent_step_lists(ex, *h, step_coef, proj, norm, first, adaptive_eta, zero_grads);
}

void restore_lists_cuda(const Lists& h) {
  const c10::cuda::CUDAGuard guard(h->device());
  CudaExec ex = exec_for(h);
  worklist::restore_lists(ex, *h);
}

std::tuple<at::Tensor, at::Tensor> restore_norms_lists_cuda(const Lists& h, double ord) {
  const c10::cuda::CUDAGuard guard(h->device());
  CudaExec ex = exec_for(h);
  return worklist::restore_norms_lists(ex, *h, ord);
}

void combine_grads_lists_cuda(const Lists& h, double weight) {
  const c10::cuda::CUDAGuard guard(h->device());
  CudaExec ex = exec_for(h);
  worklist::combine_grads_lists(ex, *h, weight);
}

const bool handle_kernels_registered = [] {
  register_handle_kernels(c10::DeviceType::CUDA,
                          HandleKernels{&norms_lists_cuda, &grad_stats_lists_cuda, &ascent_step_lists_cuda,
                                        &restore_lists_cuda, &restore_norms_lists_cuda, &combine_grads_lists_cuda});
  return true;
}();

}  // namespace
}  // namespace cuda
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CUDA, m) {
  m.impl("norms", &fastperturb::cuda::norms_cuda);
  m.impl("grad_stats_", &fastperturb::cuda::grad_stats_cuda);
  m.impl("ascent_step_", &fastperturb::cuda::ascent_step_cuda);
  m.impl("restore_", &fastperturb::cuda::restore_cuda);
  m.impl("combine_grads_", &fastperturb::cuda::combine_grads_cuda);
  m.impl("dot_stats", &fastperturb::cuda::dot_stats_cuda);
  m.impl("lincomb_", &fastperturb::cuda::lincomb_cuda);
  m.impl("ema_residual_", &fastperturb::cuda::ema_residual_cuda);
}
