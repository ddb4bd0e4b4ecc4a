// The multi-tensor work list: how a list of tensors is cut into chunks, the
// chunks into blocks, and the blocks into launches whose metadata fits in a
// kernel's argument space; plus the per-block loop and the per-op element
// functors that both the CUDA kernels (csrc/cuda) and the CPU executor
// (csrc/worklist_executor.cpp) run.
//
// Plain C++: no CUDA and no ATen includes. Functions marked FP_HD compile for
// host and device; the planner (make_plan, fill_launch, plan_finalize) is host
// only. The arithmetic of every element comes from fastperturb/math.h.
//
// Layout of one op call (see csrc/cuda/README.md for the geometry):
//   * tensors are grouped by dtype (stable: first appearance, list order
//     inside a group); each group is walked in list order;
//   * tensor i of numel N_i is cut into ceil(N_i / chunk_size) chunks; one
//     block processes one chunk; empty tensors have no chunks;
//   * blocks are packed into launches of at most max_blocks blocks and
//     max_tensors distinct tensors; a tensor whose chunks do not fit is
//     continued in the next launch (its table entry is repeated there);
//   * every block has a reduction slot: slots are numbered in walk order, so
//     the slots of tensor i are [slot_begin[i], slot_begin[i] + chunks_i) and
//     the slot of a launch's block b is first_slot + b;
//   * reducing ops write one partial per slot; a finalize pass reduces each
//     tensor's slots in a fixed order (no atomics), in launches of at most
//     kFinalizeTensors tensors, one block per tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastperturb/math.h"

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
constexpr int max_tensors_for_depth(int depth) {
  return depth == 1 ? 110 : depth == 2 ? 80 : depth == 3 ? 60 : 48;
}

// Metadata of one launch of a main kernel over `Depth` parallel lists. Passed
// by value as the kernel argument (__grid_constant__).
template <int Depth>
struct LaunchArgs {
  static constexpr int kTensors = max_tensors_for_depth(Depth);
  static constexpr int kBlocks = kMaxBlocks;
  void* ptr[Depth][kTensors];      // data of list d, table entry t (nullptr: list absent)
  int64_t numel[kTensors];         // elements of table entry t
  int64_t first_slot;              // reduction slot of block 0
  int64_t chunk_size;              // elements per chunk
  int32_t index[kTensors];         // table entry t -> tensor index in the op's lists
  int32_t block_chunk[kBlocks];    // block b -> chunk of its tensor
  int32_t n_tensors;
  int32_t n_blocks;
  uint8_t block_tensor[kBlocks];   // block b -> table entry
};

static_assert(sizeof(LaunchArgs<1>) <= kArgBudget, "LaunchArgs<1> too large");
static_assert(sizeof(LaunchArgs<2>) <= kArgBudget, "LaunchArgs<2> too large");
static_assert(sizeof(LaunchArgs<3>) <= kArgBudget, "LaunchArgs<3> too large");
static_assert(sizeof(LaunchArgs<4>) <= kArgBudget, "LaunchArgs<4> too large");
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

// ---------------------------------------------------------------------------
// The per-block loop (host and device).

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

FP_HD bool vec_aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0;
}

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kWidth = static_cast<int>(kVecBytes / sizeof(T));
  T v[kWidth];
};

// The i-th vector from p. On the host (the CPU executor) every vector access is
// checked to be aligned, as a GPU's 16-byte loads and stores must be.
template <typename T>
FP_HD Vec<T>* vec_at(T* p, int64_t i) {
  Vec<T>* v = reinterpret_cast<Vec<T>*>(p) + i;
#if !defined(__CUDA_ARCH__)
  if (!vec_aligned(v)) throw std::logic_error("work list: misaligned vector access");
#endif
  return v;
}

// Runs block `b` of a launch as lane `lane` of `nlanes` (a thread of the CUDA
// block, or one of the CPU executor's emulated lanes), folding this lane's
// reduction into `acc`. The chunk is processed with vector loads when every
// list the op touches is 16-byte aligned at the chunk's start (then the
// first floor(n / W) * W elements go by vectors of W, the rest one by one),
// else element by element. Lane k takes vectors (and leftover elements) k,
// k + nlanes, ...
template <class Op>
FP_HD void run_block(const LaunchArgs<Op::kDepth>& a, int b, const Op& op, int lane, int nlanes,
                     typename Op::Acc& acc) {
  using T = typename Op::scalar_t;
  constexpr int D = Op::kDepth;
  constexpr int W = Vec<T>::kWidth;
  const int t = a.block_tensor[b];
  const Range r = chunk_range(a.numel[t], a.block_chunk[b], a.chunk_size);
  const typename Op::PerTensor pt = op.tensor(a.index[t]);
  T* p[D];
  bool vec = true;
  for (int d = 0; d < D; ++d) {
    p[d] = a.ptr[d][t] == nullptr ? nullptr : static_cast<T*>(a.ptr[d][t]) + r.begin;
    if (op.reads(d) || op.writes(d)) vec = vec && vec_aligned(p[d]);
  }
  const int64_t n = r.end - r.begin;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / W;
    for (int64_t i = lane; i < nv; i += nlanes) {
      Vec<T> v[D] = {};
      for (int d = 0; d < D; ++d)
        if (op.reads(d)) v[d] = *vec_at(p[d], i);
      for (int k = 0; k < W; ++k) {
        T x[D];
        for (int d = 0; d < D; ++d) x[d] = v[d].v[k];
        op.element(x, acc, pt);
        for (int d = 0; d < D; ++d) v[d].v[k] = x[d];
      }
      for (int d = 0; d < D; ++d)
        if (op.writes(d)) *vec_at(p[d], i) = v[d];
    }
    done = nv * W;
  }
  for (int64_t i = done + lane; i < n; i += nlanes) {
    T x[D] = {};
    for (int d = 0; d < D; ++d)
      if (op.reads(d)) x[d] = p[d][i];
    op.element(x, acc, pt);
    for (int d = 0; d < D; ++d)
      if (op.writes(d)) p[d][i] = x[d];
  }
}

// Folds lane `lane` of `nlanes` of finalize block j: the slots of one tensor.
template <class F>
FP_HD void run_finalize(const FinalizeArgs& f, int j, const F& fin, int lane, int nlanes,
                        typename F::Acc& acc) {
  const int64_t begin = f.slot_begin[j];
  for (int64_t s = lane; s < f.slot_count[j]; s += nlanes) acc = fin.combine(acc, fin.load(begin + s));
}

// ---------------------------------------------------------------------------
// The op functors. Each names its lists (kDepth), which it reads and writes,
// what it reduces (Acc, kSlots doubles per block) and what one element does.

template <typename T>
struct compute {
  using type = float;
};
template <>
struct compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename compute<T>::type;

struct None {};

template <typename C>
struct Sums3 {
  C s0, s1, s2;
};

// norms: one list; per block the sum of squares (L2) or max |x| (Linf).
template <typename T>
struct NormsOp {
  static constexpr int kDepth = 1;
  static constexpr int kSlots = 1;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = C;
  using PerTensor = None;
  math::Norm norm;

  FP_HD bool reads(int) const { return true; }
  FP_HD bool writes(int) const { return false; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return C(0); }
  FP_HD void element(T (&x)[1], Acc& acc, const PerTensor&) const {
    acc = math::norm_accumulate(acc, static_cast<C>(x[0]), norm);
  }
  FP_HD Acc combine(Acc a, Acc b) const { return math::norm_combine(a, b, norm); }
  FP_HD void store(const Acc& acc, double* out) const { out[0] = static_cast<double>(acc); }
};

// grad_stats_: lists (grads, accum, params, backups); the last three may be
// absent. Per block [sum (t g)^2, sum d g, sum d^2]; accum (+)= w g.
template <typename T>
struct StatsOp {
  static constexpr int kDepth = 4;
  static constexpr int kSlots = 3;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = Sums3<C>;
  using PerTensor = None;
  C accum_weight;
  C eta;
  bool accum_init;
  bool has_accum;
  bool has_params;
  bool has_backups;
  bool adaptive;

  FP_HD bool reads(int d) const {
    return d == 0 || (d == 1 && has_accum && !accum_init) ||
           (d == 2 && has_params && (adaptive || has_backups)) || (d == 3 && has_backups);
  }
  FP_HD bool writes(int d) const { return d == 1 && has_accum; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return Acc{C(0), C(0), C(0)}; }
  FP_HD void element(T (&x)[4], Acc& acc, const PerTensor&) const {
    const C g = static_cast<C>(x[0]);
    const C w = static_cast<C>(x[2]);
    const C b = static_cast<C>(x[3]);
    math::stats_element(g, w, b, eta, adaptive, has_backups, acc.s0, acc.s1, acc.s2);
    if (has_accum) x[1] = static_cast<T>(math::accum_element(static_cast<C>(x[1]), g, accum_weight, accum_init));
  }
  FP_HD Acc combine(const Acc& a, const Acc& b) const { return Acc{a.s0 + b.s0, a.s1 + b.s1, a.s2 + b.s2}; }
  FP_HD void store(const Acc& acc, double* out) const {
    out[0] = static_cast<double>(acc.s0);
    out[1] = static_cast<double>(acc.s1);
    out[2] = static_cast<double>(acc.s2);
  }
};

// ascent_step_: lists (params, grads, backups); per-tensor coefficients read
// from the float32 arrays step_coef[index], proj[index].
template <typename T>
struct AscentOp {
  static constexpr int kDepth = 3;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = None;
  using PerTensor = math::AscentCoefs<C>;
  const float* step_coef;
  const float* proj;
  C eta;
  math::Norm norm;
  bool first;
  bool zero_grads;

  FP_HD bool reads(int d) const { return d != 2 || !first; }
  FP_HD bool writes(int d) const { return d == 0 || (d == 1 && zero_grads) || (d == 2 && first); }
  FP_HD PerTensor tensor(int i) const {
    return PerTensor{static_cast<C>(step_coef[i]), static_cast<C>(proj[i]), eta, norm, first};
  }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[3], Acc&, const PerTensor& k) const {
    const C w = static_cast<C>(x[0]);
    const C b = first ? w : static_cast<C>(x[2]);
    const C nw = math::ascent_element(w, b, static_cast<C>(x[1]), k);
    if (first) x[2] = x[0];
    x[0] = static_cast<T>(nw);
    if (zero_grads) x[1] = static_cast<T>(C(0));
  }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// restore_: lists (params, backups); params = backups, element copies of the
// storage type (bit for bit).
template <typename T>
struct RestoreOp {
  static constexpr int kDepth = 2;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using Acc = None;
  using PerTensor = None;

  FP_HD bool reads(int d) const { return d == 1; }
  FP_HD bool writes(int d) const { return d == 0; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[2], Acc&, const PerTensor&) const { x[0] = x[1]; }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// combine_grads_: lists (grads, accum); grads = accum + weight * grads.
template <typename T>
struct CombineOp {
  static constexpr int kDepth = 2;
  static constexpr int kSlots = 0;
  using scalar_t = T;
  using C = compute_t<T>;
  using Acc = None;
  using PerTensor = None;
  C weight;

  FP_HD bool reads(int) const { return true; }
  FP_HD bool writes(int d) const { return d == 0; }
  FP_HD PerTensor tensor(int) const { return {}; }
  FP_HD Acc identity() const { return {}; }
  FP_HD void element(T (&x)[2], Acc&, const PerTensor&) const {
    x[0] = static_cast<T>(math::combine_element(static_cast<C>(x[1]), static_cast<C>(x[0]), weight));
  }
  FP_HD Acc combine(Acc a, Acc) const { return a; }
  FP_HD void store(const Acc&, double*) const {}
};

// Finalize of norms: combines a tensor's partials (double), writes the
// accumulator to acc_out[index] (when not null) and the norm, as float32, to
// out[index]. Also reduces the per-tensor accumulators into the total norm
// (one "tensor" whose slots are the n accumulators, acc_out = nullptr).
struct FinalizeNorm {
  using Acc = double;
  const double* in;
  double* acc_out;
  float* out;
  math::Norm norm;

  FP_HD Acc identity() const { return 0.0; }
  FP_HD Acc load(int64_t slot) const { return in[slot]; }
  FP_HD Acc combine(Acc a, Acc b) const { return math::norm_combine(a, b, norm); }
  FP_HD void store(int index, Acc acc) const {
    if (acc_out != nullptr) acc_out[index] = acc;
    out[index] = static_cast<float>(math::norm_finish(acc, norm));
  }
};

// Finalize of grad_stats_: sums a tensor's three partial columns into the
// float32 [n, 3] result.
struct FinalizeStats {
  using Acc = Sums3<double>;
  const double* in;
  float* out;

  FP_HD Acc identity() const { return Acc{0.0, 0.0, 0.0}; }
  FP_HD Acc load(int64_t slot) const { return Acc{in[3 * slot], in[3 * slot + 1], in[3 * slot + 2]}; }
  FP_HD Acc combine(const Acc& a, const Acc& b) const { return Acc{a.s0 + b.s0, a.s1 + b.s1, a.s2 + b.s2}; }
  FP_HD void store(int index, const Acc& acc) const {
    out[3 * index] = static_cast<float>(acc.s0);
    out[3 * index + 1] = static_cast<float>(acc.s1);
    out[3 * index + 2] = static_cast<float>(acc.s2);
  }
};

// ---------------------------------------------------------------------------
// The planner (host only).

struct Limits {
  int64_t chunk_size = kChunkSize;
  int max_tensors = max_tensors_for_depth(1);
  int max_blocks = kMaxBlocks;
};

struct PlannedBlock {
  int32_t entry;  // table entry of the launch
  int32_t chunk;  // chunk of that tensor
};

struct PlannedLaunch {
  int group;                         // dtype group
  int64_t first_slot;                // slot of blocks[0]
  std::vector<int32_t> tensors;      // table: entry -> tensor index
  std::vector<PlannedBlock> blocks;
};

struct Plan {
  int64_t chunk_size = kChunkSize;
  std::vector<std::vector<int32_t>> groups;  // tensor indices of each group, in list order
  std::vector<PlannedLaunch> launches;       // group by group, in walk order
  std::vector<int64_t> slot_begin;           // per tensor index
  std::vector<int32_t> slot_count;           // per tensor index (= its chunks)
  int64_t total_slots = 0;
};

inline void check_limits(const Limits& lim, int depth) {
  if (lim.chunk_size < 1)
    throw std::invalid_argument("work list: chunk_size must be >= 1, got " + std::to_string(lim.chunk_size));
  const int cap = max_tensors_for_depth(depth);
  if (lim.max_tensors < 1 || lim.max_tensors > cap)
    throw std::invalid_argument("work list: max_tensors must be in [1, " + std::to_string(cap) +
                                "] for " + std::to_string(depth) + " lists, got " +
                                std::to_string(lim.max_tensors));
  if (lim.max_blocks < 1 || lim.max_blocks > kMaxBlocks)
    throw std::invalid_argument("work list: max_blocks must be in [1, " + std::to_string(kMaxBlocks) +
                                "], got " + std::to_string(lim.max_blocks));
}

// Plans one op call over tensors of the given numels; keys[i] (e.g. the dtype)
// puts tensor i in a group, and a launch never mixes groups. `depth` is the
// number of parallel lists (it bounds max_tensors).
inline Plan make_plan(const std::vector<int64_t>& numels, const std::vector<int>& keys, const Limits& lim,
                      int depth) {
  check_limits(lim, depth);
  if (keys.size() != numels.size())
    throw std::invalid_argument("work list: one key per tensor is needed");
  const std::size_t n = numels.size();
  if (n > static_cast<std::size_t>(INT32_MAX))
    throw std::invalid_argument("work list: too many tensors");
  Plan plan;
  plan.chunk_size = lim.chunk_size;
  plan.slot_begin.assign(n, 0);
  plan.slot_count.assign(n, 0);

  std::vector<int> group_keys;
  for (std::size_t i = 0; i < n; ++i) {
    std::size_t g = 0;
    while (g < group_keys.size() && group_keys[g] != keys[i]) ++g;
    if (g == group_keys.size()) {
      group_keys.push_back(keys[i]);
      plan.groups.emplace_back();
    }
    plan.groups[g].push_back(static_cast<int32_t>(i));
  }

  int64_t slot = 0;
  for (std::size_t g = 0; g < plan.groups.size(); ++g) {
    PlannedLaunch cur;
    auto open = [&]() {
      cur = PlannedLaunch{};
      cur.group = static_cast<int>(g);
      cur.first_slot = slot;
    };
    auto flush = [&]() {
      if (!cur.blocks.empty()) plan.launches.push_back(std::move(cur));
      open();
    };
    open();
    for (int32_t i : plan.groups[g]) {
      const int64_t numel = numels[static_cast<std::size_t>(i)];
      if (numel < 0) throw std::invalid_argument("work list: negative numel");
      const int64_t chunks = numel / lim.chunk_size + (numel % lim.chunk_size != 0 ? 1 : 0);
      if (chunks > INT32_MAX) throw std::invalid_argument("work list: tensor too large for the chunk size");
      plan.slot_begin[static_cast<std::size_t>(i)] = slot;
      plan.slot_count[static_cast<std::size_t>(i)] = static_cast<int32_t>(chunks);
      if (chunks == 0) continue;
      if (static_cast<int>(cur.tensors.size()) == lim.max_tensors ||
          static_cast<int>(cur.blocks.size()) == lim.max_blocks)
        flush();
      cur.tensors.push_back(i);
      for (int64_t c = 0; c < chunks; ++c) {
        if (static_cast<int>(cur.blocks.size()) == lim.max_blocks) {
          flush();  // the tensor goes on in the next launch
          cur.tensors.push_back(i);
        }
        cur.blocks.push_back(
            PlannedBlock{static_cast<int32_t>(cur.tensors.size() - 1), static_cast<int32_t>(c)});
        ++slot;
      }
    }
    flush();
  }
  plan.total_slots = slot;
  return plan;
}

// The kernel argument of one planned launch. ptrs(d, i) gives the data of
// tensor index i in list d (nullptr for an absent list).
template <int Depth, class Ptrs>
LaunchArgs<Depth> fill_launch(const Plan& plan, const PlannedLaunch& l, const std::vector<int64_t>& numels,
                              Ptrs&& ptrs) {
  LaunchArgs<Depth> a{};
  if (static_cast<int>(l.tensors.size()) > LaunchArgs<Depth>::kTensors ||
      static_cast<int>(l.blocks.size()) > LaunchArgs<Depth>::kBlocks)
    throw std::logic_error("work list: planned launch exceeds the kernel argument capacity");
  a.n_tensors = static_cast<int32_t>(l.tensors.size());
  a.n_blocks = static_cast<int32_t>(l.blocks.size());
  a.first_slot = l.first_slot;
  a.chunk_size = plan.chunk_size;
  for (std::size_t t = 0; t < l.tensors.size(); ++t) {
    const int32_t i = l.tensors[t];
    a.index[t] = i;
    a.numel[t] = numels[static_cast<std::size_t>(i)];
    for (int d = 0; d < Depth; ++d) a.ptr[d][t] = ptrs(d, i);
  }
  for (std::size_t b = 0; b < l.blocks.size(); ++b) {
    a.block_tensor[b] = static_cast<uint8_t>(l.blocks[b].entry);
    a.block_chunk[b] = l.blocks[b].chunk;
  }
  return a;
}

// Finalize launches covering tensor indices 0..n-1 in order, at most
// max_tensors (<= kFinalizeTensors) per launch.
inline std::vector<FinalizeArgs> plan_finalize(const Plan& plan, int max_tensors = kFinalizeTensors) {
  if (max_tensors < 1 || max_tensors > kFinalizeTensors)
    throw std::invalid_argument("work list: finalize max_tensors must be in [1, " +
                                std::to_string(kFinalizeTensors) + "]");
  std::vector<FinalizeArgs> out;
  const std::size_t n = plan.slot_begin.size();
  for (std::size_t i = 0; i < n; ++i) {
    if (out.empty() || out.back().n == max_tensors) {
      out.emplace_back();
      out.back() = FinalizeArgs{};
    }
    FinalizeArgs& f = out.back();
    f.slot_begin[f.n] = plan.slot_begin[i];
    f.slot_count[f.n] = plan.slot_count[i];
    f.index[f.n] = static_cast<int32_t>(i);
    ++f.n;
  }
  return out;
}

// One finalize launch of one block reducing slots [0, count) of `in`: the
// total over the per-tensor accumulators.
inline FinalizeArgs single_finalize(int64_t count) {
  if (count > INT32_MAX) throw std::invalid_argument("work list: too many tensors");
  FinalizeArgs f{};
  f.slot_begin[0] = 0;
  f.slot_count[0] = static_cast<int32_t>(count);
  f.index[0] = 0;
  f.n = 1;
  return f;
}

}  // namespace worklist
}  // namespace fastperturb
