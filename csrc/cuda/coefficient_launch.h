// Host entry point of ascent_coefficients' CUDA kernel (coefficient_kernels.cu, instantiated there for float and
// double statistics). Plain C++: coefficient_ops.cpp, compiled by the host compiler, calls it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastperturb {
namespace cuda {

// Threads of the kernel's single block.
inline constexpr int kCoefficientThreads = 256;

// One launch of one block on stream: step_out[i], proj_out[i] for the n rows of stats ([n, 3], contiguous) and the
// float64 eta[i], radius[i]; nothing is launched for n = 0.
template <typename T>
void launch_ascent_coefficients(const T* stats, const double* eta, const double* radius, int64_t n, bool global_scope,
                                bool project, float* step_out, float* proj_out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastperturb
