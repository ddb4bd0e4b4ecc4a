// The CUDA kernels of the fused restore + base-optimizer steps: one main kernel over the work list
// (element-wise, so no block reduction), instantiated for SgdStepOp and AdamStepOp of every dtype.
// The per-element work is worklist::run_block with the functors of fastperturb/worklist/step_ops.h,
// which the CPU executor of the test build runs too.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/step_launch.h"
#include "fastperturb/worklist/step_ops.h"

namespace fastperturb {
namespace cuda {
namespace {

template <class Op>
__global__ void __launch_bounds__(worklist::kThreads)
    step_kernel(const __grid_constant__ worklist::LaunchArgs<Op::kDepth> a, const Op op) {
  static_assert(Op::kSlots == 0, "the step kernels do not reduce");
  typename Op::Acc acc = op.identity();
  worklist::run_block(a, static_cast<int>(blockIdx.x), op, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
                      acc);
}

}  // namespace

template <class Op>
void launch_step(const worklist::LaunchArgs<Op::kDepth>& a, const Op& op, cudaStream_t stream) {
  if (a.n_blocks == 0) return;
  step_kernel<Op><<<static_cast<unsigned>(a.n_blocks), worklist::kThreads, 0, stream>>>(a, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FASTPERTURB_INSTANTIATE_STEP(OP) \
  template void launch_step<OP>(const worklist::LaunchArgs<OP::kDepth>&, const OP&, cudaStream_t);

FASTPERTURB_CUDA_FOR_EACH_STEP(FASTPERTURB_INSTANTIATE_STEP)

}  // namespace cuda
}  // namespace fastperturb
