// The geometry of the multi-tensor work list and the kernel arguments that
// carry one launch of it: what the planner (plan.h) fills on the host and the
// per-block loop (device.h) reads on the device. Plain C++ (no CUDA, no ATen);
// see csrc/cuda/README.md for the numbers and docs/design.md §5.3 for the
// design.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastperturb/math.h"

// The oldest GPU architecture the kernels compile for, as __CUDA_ARCH__ spells it (compute capability 7.0): they
// take their launch arguments as __grid_constant__ parameters. setup.py reads this line to check
// TORCH_CUDA_ARCH_LIST before it compiles anything; the #error stops any other build (CMake) with a message.
#define FASTPERTURB_MIN_CUDA_ARCH 700
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < FASTPERTURB_MIN_CUDA_ARCH
#error \
    "fastperturb's CUDA kernels need compute capability 7.0 or newer (__grid_constant__ launch arguments): remove the older architectures from TORCH_CUDA_ARCH_LIST, or build without CUDA (FASTPERTURB_CUDA=0)"
#endif

namespace fastperturb {
namespace worklist {

// ---------------------------------------------------------------------------
// Geometry and capacities.

constexpr int64_t kChunkSize = 65536;  // elements per block (CUDA default)
constexpr int kThreads = 512;          // threads per block of the main kernels
constexpr int kFinalizeThreads = 256;  // threads per block of the finalize kernel
constexpr int kVecBytes = 16;          // one vector load/store (ld.global.v4)
constexpr int kMaxBlocks = 320;        // blocks per launch
constexpr int kFinalizeTensors = 240;  // tensors per finalize launch
// The launch metadata structs below stay under this many bytes, leaving room
// for the op functor and a pointer within the classic 4096-byte limit of
// kernel parameters.
constexpr std::size_t kArgBudget = 3900;

// Distinct tensors per launch, by depth (the number of parallel lists).
// Depths 5 and 6 are the fused Adam step's lists (worklist/step_ops.h).
constexpr int max_tensors_for_depth(int depth) {
  return depth == 1 ? 110 : depth == 2 ? 80 : depth == 3 ? 60 : depth == 4 ? 48 : 32;
}

// Metadata of one launch of a main kernel over `Depth` parallel lists. Passed
// by value as the kernel argument (__grid_constant__).
template <int Depth>
struct LaunchArgs {
  static constexpr int kTensors = max_tensors_for_depth(Depth);
  static constexpr int kBlocks = kMaxBlocks;
  void* ptr[Depth][kTensors];    // data of list d, table entry t (nullptr: list absent)
  int64_t numel[kTensors];       // elements of table entry t
  int64_t first_slot;            // reduction slot of block 0
  int64_t chunk_size;            // elements per chunk
  int32_t index[kTensors];       // table entry t -> tensor index in the op's lists
  int32_t block_chunk[kBlocks];  // block b -> chunk of its tensor
  int32_t n_tensors;
  int32_t n_blocks;
  uint8_t block_tensor[kBlocks];  // block b -> table entry
};

static_assert(sizeof(LaunchArgs<1>) <= kArgBudget, "LaunchArgs<1> too large");
static_assert(sizeof(LaunchArgs<2>) <= kArgBudget, "LaunchArgs<2> too large");
static_assert(sizeof(LaunchArgs<3>) <= kArgBudget, "LaunchArgs<3> too large");
static_assert(sizeof(LaunchArgs<4>) <= kArgBudget, "LaunchArgs<4> too large");
static_assert(sizeof(LaunchArgs<6>) <= kArgBudget, "LaunchArgs<6> too large");
static_assert(max_tensors_for_depth(1) <= 255, "block_tensor is a uint8_t");

// Metadata of one finalize launch: block j reduces the slots
// [slot_begin[j], slot_begin[j] + slot_count[j]) of tensor index[j].
struct FinalizeArgs {
  int64_t slot_begin[kFinalizeTensors];
  int32_t slot_count[kFinalizeTensors];
  int32_t index[kFinalizeTensors];
  int32_t n;
};

static_assert(sizeof(FinalizeArgs) <= kArgBudget, "FinalizeArgs too large");

// Elements of one chunk.
struct Range {
  int64_t begin;
  int64_t end;
};

// Elements [begin, end) of chunk `chunk` of a tensor of `numel` elements.
FP_HD Range chunk_range(int64_t numel, int64_t chunk, int64_t chunk_size) {
  const int64_t begin = chunk * chunk_size;
  const int64_t end = begin + chunk_size < numel ? begin + chunk_size : numel;
  return Range{begin, end};
}

}  // namespace worklist
}  // namespace fastperturb
