// The CUDA kernels of the fused ops. All the per-element work is the shared
// per-block loop and op functors of fastperturb/worklist/device.h (executed on
// CPU by the test build's work-list executor); what is CUDA-only is the thread indexing below and
// the deterministic block reduction (cub::BlockReduce: a fixed tree for a
// fixed block size, no atomics).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cub/block/block_reduce.cuh>

#include "cuda/launch.h"
#include "fastperturb/worklist/device.h"

namespace fastperturb {
namespace cuda {
namespace {

using worklist::FinalizeArgs;
using worklist::kFinalizeThreads;
using worklist::kThreads;
using worklist::LaunchArgs;

template <class Op, typename A>
struct CombineFn {
  Op op;
  __device__ __forceinline__ A operator()(const A& a, const A& b) const { return op.combine(a, b); }
};

// Block b processes chunk a.block_chunk[b] of table entry a.block_tensor[b];
// thread k of the block is lane k (worklist::run_block). A reducing op's
// block total lands in slot a.first_slot + b.
template <class Op>
__global__ void __launch_bounds__(kThreads)
    main_kernel(const __grid_constant__ LaunchArgs<Op::kDepth> a, const Op op, double* partials) {
  using Wide = worklist::wide_t<typename Op::Acc>;  // (the lanes combine in double: worklist::kLaneRun)
  Wide acc = worklist::widen(op.identity());
  worklist::run_block(a, static_cast<int>(blockIdx.x), op, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
                      acc);
  if constexpr (Op::kSlots > 0) {
    using Reduce = cub::BlockReduce<Wide, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const Wide total = Reduce(tmp).Reduce(acc, CombineFn<Op, Wide>{op});
    if (threadIdx.x == 0) op.store(total, partials + (a.first_slot + blockIdx.x) * Op::kSlots);
  }
}

// Block j reduces the slots of tensor f.index[j], thread k taking slots
// k, k + blockDim.x, ... (worklist::run_finalize).
template <class F>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const __grid_constant__ FinalizeArgs f, const F fin) {
  typename F::Acc acc = fin.identity();
  worklist::run_finalize(f, static_cast<int>(blockIdx.x), fin, static_cast<int>(threadIdx.x),
                         static_cast<int>(blockDim.x), acc);
  using Reduce = cub::BlockReduce<typename F::Acc, kFinalizeThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const typename F::Acc total = Reduce(tmp).Reduce(acc, CombineFn<F, typename F::Acc>{fin});
  if (threadIdx.x == 0) fin.store(f.index[blockIdx.x], total);
}

}  // namespace

template <class Op>
void launch_main(const LaunchArgs<Op::kDepth>& a, const Op& op, double* partials, cudaStream_t stream) {
  if (a.n_blocks == 0) return;
  main_kernel<Op><<<static_cast<unsigned>(a.n_blocks), kThreads, 0, stream>>>(a, op, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F>
void launch_finalize(const FinalizeArgs& f, const F& fin, cudaStream_t stream) {
  if (f.n == 0) return;
  finalize_kernel<F><<<static_cast<unsigned>(f.n), kFinalizeThreads, 0, stream>>>(f, fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FASTPERTURB_INSTANTIATE_MAIN(OP) \
  template void launch_main<OP>(const LaunchArgs<OP::kDepth>&, const OP&, double*, cudaStream_t);
#define FASTPERTURB_INSTANTIATE_FINALIZE(F) \
  template void launch_finalize<F>(const FinalizeArgs&, const F&, cudaStream_t);

FASTPERTURB_CUDA_FOR_EACH_MAIN(FASTPERTURB_INSTANTIATE_MAIN)
FASTPERTURB_CUDA_FOR_EACH_FINALIZE(FASTPERTURB_INSTANTIATE_FINALIZE)

}  // namespace cuda
}  // namespace fastperturb
