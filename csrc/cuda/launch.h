// Host entry points of the CUDA kernels (defined in kernels.cu, explicitly
// instantiated there for every op and dtype the launcher uses). Plain C++:
// ops.cpp, compiled by the host compiler, calls these.
#pragma once

#include <cuda_runtime_api.h>

#include "fastperturb/worklist/device.h"

namespace fastperturb {
namespace cuda {

// One launch of op's main kernel: grid = a.n_blocks, worklist::kThreads
// threads a block. Reducing ops write kSlots doubles per block to
// partials[(a.first_slot + block) * kSlots ...].
template <class Op>
void launch_main(const worklist::LaunchArgs<Op::kDepth>& a, const Op& op, double* partials, cudaStream_t stream);

// One launch of the finalize kernel: grid = f.n, worklist::kFinalizeThreads
// threads a block; block j reduces the slots of tensor f.index[j].
template <class F>
void launch_finalize(const worklist::FinalizeArgs& f, const F& fin, cudaStream_t stream);

// The instantiations kernels.cu provides.
#define FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, OP) \
  X(OP<c10::Half>)                             \
  X(OP<c10::BFloat16>)                         \
  X(OP<float>)                                 \
  X(OP<double>)

#define FASTPERTURB_CUDA_FOR_EACH_MAIN(X)                      \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::NormsOp)        \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::StatsOp)        \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::AscentOp)       \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::RestoreOp)      \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::RestoreNormsOp) \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::CombineOp)      \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::DotOp)          \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::LincombOp)      \
  FASTPERTURB_CUDA_FOR_EACH_DTYPE(X, worklist::EmaOp)

#define FASTPERTURB_CUDA_FOR_EACH_FINALIZE(X) \
  X(worklist::FinalizeNorm)                   \
  X(worklist::FinalizeStats)                  \
  X(worklist::FinalizeSum)

}  // namespace cuda
}  // namespace fastperturb
