// ascent_coefficients' CUDA kernel: one block walks the n rows of grad_stats_ with math.h's ascent_step_coef,
// moved_sq, projection_coef and (global scope) ball_weight and global_projection_coef (the CPU op's arithmetic, so
// per-tensor results are the CPU's bits). The global scope's sums and maximum over all tensors are a per-thread strided
// sum and cub::BlockReduce: a fixed tree for the fixed block size, so reruns are bit-identical. n is the number of
// tensors (hundreds to thousands): one block is one launch instead of the reference's dozen tiny ones, which is the
// point.
#include <c10/cuda/CUDAException.h>

#include <cub/block/block_reduce.cuh>

#include "cuda/coefficient_launch.h"
#include "fastperturb/math.h"

namespace fastperturb {
namespace cuda {
namespace {

// (CUB's own max functor moved between CCCL releases; this one is the same operation in every one)
struct MaxOf {  // NaN if either is (fmax would drop it; the reference's max keeps it)
  __device__ double operator()(double a, double b) const { return math::max_nan(a, b); }
};

template <typename T>
__global__ void __launch_bounds__(kCoefficientThreads)
    coefficients_kernel(const T* __restrict__ stats, const double* __restrict__ eta, const double* __restrict__ radius,
                        int64_t n, bool global_scope, bool project, float* __restrict__ step_out,
                        float* __restrict__ proj_out) {
  using Reduce = cub::BlockReduce<double, kCoefficientThreads>;
  __shared__ typename Reduce::TempStorage scratch;
  __shared__ double sums[3];  // gg's total, the largest radius, the weighed u^2 total
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
  auto moved_of = [&](int64_t i) { return math::moved_sq(step_of(i), col(i, 0), col(i, 1), col(i, 2)); };
  for (int64_t i = k; i < n; i += kCoefficientThreads) {
    step_out[i] = static_cast<float>(step_of(i));
    if (!project)
      proj_out[i] = 1.0f;
    else if (!global_scope)
      proj_out[i] = static_cast<float>(math::projection_coef(radius[i], moved_of(i)));
  }
  if (!(project && global_scope)) return;
  // The largest radius, then the u^2 terms weighed in its units (math.h ball_weight). Each reduction reuses the
  // scratch after the barrier that ended the one before.
  double r_part = 0.0;
  for (int64_t i = k; i < n; i += kCoefficientThreads) r_part = math::max_nan(r_part, radius[i]);
  const double r_top = Reduce(scratch).Reduce(r_part, MaxOf{});
  if (k == 0) sums[1] = r_top;
  __syncthreads();
  double part = 0.0;
  for (int64_t i = k; i < n; i += kCoefficientThreads) part += math::ball_weight(sums[1], radius[i]) * moved_of(i);
  const double total = Reduce(scratch).Sum(part);
  if (k == 0) sums[2] = total;
  __syncthreads();
  for (int64_t i = k; i < n; i += kCoefficientThreads)
    proj_out[i] = static_cast<float>(math::global_projection_coef(sums[1], radius[i], sums[2], moved_of(i)));
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
