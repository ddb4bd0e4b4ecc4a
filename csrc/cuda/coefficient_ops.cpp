// ascent_coefficients for CUDA tensors: TORCH_LIBRARY_IMPL(fastperturb, CUDA). The checks are the CPU op's
// (common/checks.h); the kernel is coefficient_kernels.cu, one launch on the current stream, no host
// synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "cuda/coefficient_launch.h"

namespace fastperturb {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> ascent_coefficients_cuda(const at::Tensor& stats, const at::Tensor& step_size,
                                                            const at::Tensor& radius, bool global_scope, bool project) {
  checks::check_ascent_coefficients(stats, step_size, radius);
  TORCH_CHECK_VALUE(stats.is_cuda(), "fastperturb's CUDA kernels got stats on ", stats.device(),
                    "; pass CUDA tensors (or use the CPU kernels for CPU tensors)");
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor s = stats.contiguous(), eta = step_size.contiguous(), r = radius.contiguous();
  const int64_t n = s.size(0);
  at::Tensor step = at::empty({n}, s.options().dtype(at::kFloat)), proj = at::empty({n}, s.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  if (s.dtype() == at::kFloat)
    launch_ascent_coefficients(s.data_ptr<float>(), eta.data_ptr<double>(), r.data_ptr<double>(), n, global_scope,
                               project, step.data_ptr<float>(), proj.data_ptr<float>(), stream);
  else
    launch_ascent_coefficients(s.data_ptr<double>(), eta.data_ptr<double>(), r.data_ptr<double>(), n, global_scope,
                               project, step.data_ptr<float>(), proj.data_ptr<float>(), stream);
  return {step, proj};
}

}  // namespace
}  // namespace cuda
}  // namespace fastperturb

TORCH_LIBRARY_IMPL(fastperturb, CUDA, m) {
  m.impl("ascent_coefficients", &fastperturb::cuda::ascent_coefficients_cuda);
}
