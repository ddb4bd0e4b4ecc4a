// Host entry point of the fused-step CUDA kernels (step_kernels.cu, explicitly instantiated there for
// every op and dtype). Plain C++: step_ops.cpp, compiled by the host compiler, calls it.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/launch.h"
#include "fastperturb/worklist/step_ops.h"

namespace fastperturb {
namespace cuda {

// One launch: grid = a.n_blocks, worklist::kThreads threads a block.
template <class Op>
void launch_step(const worklist::LaunchArgs<Op::kDepth>& a, const Op& op, cudaStream_t stream);

#define FASTPERTURB_CUDA_FOR_EACH_STEP(X)                 \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::SgdStepOp) \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::AdamStepOp)

}  // namespace cuda
}  // namespace fastperturb
