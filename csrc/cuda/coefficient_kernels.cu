// ascent_coefficients' CUDA kernel: one block walks the n rows of grad_stats_ with math.h's ascent_step_coef,
// moved_sq and projection_coef (the CPU op's arithmetic, so per-tensor results are the CPU's bits). The global
// scope's two sums over all tensors are a per-thread strided sum and cub::BlockReduce: a fixed tree for the fixed
// block size, so reruns are bit-identical. n is the number of tensors (hundreds to thousands): one block is one
// launch instead of the reference's dozen tiny ones, which is the point.
#include <c10/cuda/CUDAException.h>

#include <cub/block/block_reduce.cuh>

#include "cuda/coefficient_launch.h"
#include "fastperturb/math.h"

namespace fastperturb {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kCoefficientThreads)
    coefficients_kernel(const T* __restrict__ stats, const double* __restrict__ eta, const double* __restrict__ radius,
                        int64_t n, bool global_scope, bool project, float* __restrict__ step_out,
                        float* __restrict__ proj_out) {
  using Reduce = cub::BlockReduce<double, kCoefficientThreads>;
  __shared__ typename Reduce::TempStorage scratch;
  __shared__ double sums[2];
  const int64_t k = threadIdx.x;
  auto col = [&](int64_t i, int c) { return static_cast<double>(stats[3 * i + c]); };
  if (global_scope) {
    double part = 0.0;
    for (int64_t i = k; i < n; i += kCoefficientThreads) part += col(i, 0);
    const double total = Reduce(scratch).Sum(part);
    if (k == 0) sums[0] = total;
    __syncthreads();
  }
  auto step_of = [&](int64_t i) { return math::ascent_step_coef(eta[i], global_scope ? sums[0] : col(i, 0)); };
  auto moved_of = [&](int64_t i, double a) { return math::moved_sq(a, col(i, 0), col(i, 1), col(i, 2)); };
  double part = 0.0;
  for (int64_t i = k; i < n; i += kCoefficientThreads) {
    const double a = step_of(i);
    step_out[i] = static_cast<float>(a);
    if (!project)
      proj_out[i] = 1.0f;
    else if (global_scope)
      part += moved_of(i, a);
    else
      proj_out[i] = static_cast<float>(math::projection_coef(radius[i], moved_of(i, a)));
  }
  if (!(project && global_scope)) return;
  const double total = Reduce(scratch).Sum(part);  // (scratch is free again: the first Sum ended in a barrier)
  if (k == 0) sums[1] = total;
  __syncthreads();
  for (int64_t i = k; i < n; i += kCoefficientThreads)
    proj_out[i] = static_cast<float>(math::projection_coef(radius[i], sums[1]));
}

}  // namespace

template <typename T>
void launch_ascent_coefficients(const T* stats, const double* eta, const double* radius, int64_t n, bool global_scope,
                                bool project, float* step_out, float* proj_out, cudaStream_t stream) {
  if (n == 0) return;
  coefficients_kernel<T>
      <<<1, kCoefficientThreads, 0, stream>>>(stats, eta, radius, n, global_scope, project, step_out, proj_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_ascent_coefficients<float>(const float*, const double*, const double*, int64_t, bool, bool, float*,
                                                float*, cudaStream_t);
template void launch_ascent_coefficients<double>(const double*, const double*, const double*, int64_t, bool, bool,
                                                 float*, float*, cudaStream_t);

}  // namespace cuda
}  // namespace fastperturb
