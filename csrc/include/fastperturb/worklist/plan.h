// The host half of the work list: how a list of tensors is cut into chunks,
// the chunks into blocks and the blocks into launches whose metadata fits in
// a kernel's argument space (make_plan), the kernel argument of each launch
// (fill_launch) and the finalize launches that reduce the per-block partials
// (plan_finalize). Plain C++, host only.
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

#include "fastperturb/worklist/launch_args.h"

namespace fastperturb {
namespace worklist {

struct Limits {
  int64_t chunk_size = kChunkSize;
  int max_tensors = max_tensors_for_depth(1);
  int max_blocks = kMaxBlocks;

  bool operator==(const Limits&) const = default;
};

struct PlannedBlock {
  int32_t entry;  // table entry of the launch
  int32_t chunk;  // chunk of that tensor
};

struct PlannedLaunch {
  int group;                     // dtype group
  int64_t first_slot;            // slot of blocks[0]
  std::vector<int32_t> tensors;  // table: entry -> tensor index
  std::vector<PlannedBlock> blocks;
};

struct Plan {
  int64_t chunk_size = kChunkSize;
  std::vector<int64_t> numels;               // per tensor index, as planned
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
    throw std::invalid_argument("work list: max_tensors must be in [1, " + std::to_string(cap) + "] for " +
                                std::to_string(depth) + " lists, got " + std::to_string(lim.max_tensors));
  if (lim.max_blocks < 1 || lim.max_blocks > kMaxBlocks)
    throw std::invalid_argument("work list: max_blocks must be in [1, " + std::to_string(kMaxBlocks) + "], got " +
                                std::to_string(lim.max_blocks));
}

// Plans one op call over tensors of the given numels; keys[i] (e.g. the dtype)
// puts tensor i in a group, and a launch never mixes groups. `depth` is the
// number of parallel lists (it bounds max_tensors).
inline Plan make_plan(const std::vector<int64_t>& numels, const std::vector<int>& keys, const Limits& lim, int depth) {
  check_limits(lim, depth);
  if (keys.size() != numels.size()) throw std::invalid_argument("work list: one key per tensor is needed");
  const std::size_t n = numels.size();
  if (n > static_cast<std::size_t>(INT32_MAX)) throw std::invalid_argument("work list: too many tensors");
  Plan plan;
  plan.chunk_size = lim.chunk_size;
  plan.numels = numels;
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
        cur.blocks.push_back(PlannedBlock{static_cast<int32_t>(cur.tensors.size() - 1), static_cast<int32_t>(c)});
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
LaunchArgs<Depth> fill_launch(const Plan& plan, const PlannedLaunch& l, Ptrs&& ptrs) {
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
    a.numel[t] = plan.numels[static_cast<std::size_t>(i)];
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
    throw std::invalid_argument("work list: finalize max_tensors must be in [1, " + std::to_string(kFinalizeTensors) +
                                "]");
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
