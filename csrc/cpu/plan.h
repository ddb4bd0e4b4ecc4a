// The multi-tensor work plan of the CPU kernels: every tensor of a list is cut
// into chunks of at most kChunk elements (a tensor smaller than that is one
// chunk), and consecutive chunks are grouped into tasks of roughly kChunk
// elements, so one at::parallel_for over the tasks covers the whole list and
// a thousand tiny tensors cost about what one tensor of the same size does.
//
// Determinism: chunk boundaries depend only on the tensors' sizes (never on
// the number of threads), each chunk reduces its elements in a fixed order
// (see loops.h), and the chunk partials are combined per tensor in chunk
// order by the caller. So reductions are bit-identical for any thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastperturb {
namespace cpu {

// Elements per chunk. Fixed: changing it changes the rounding of reductions.
constexpr int64_t kChunk = int64_t(1) << 16;
// Cost of a chunk in elements beyond its size (dispatch, pointer set-up), so
// that tasks made of many tiny chunks stay small enough to balance.
constexpr int64_t kChunkOverhead = 256;
// A list of fewer elements than this (1 MB of float32) runs on the calling
// thread: one thread finishes it in 0.1-0.2 ms, and on a busy machine waking
// a second thread can cost milliseconds (measured here: 1000 tensors of 100
// elements took 4-12 ms with 2 threads against 0.4 ms with one). Above it two
// threads measured 1.4-2x faster (lists of 256K to 1M elements, quiet host;
// docs/design.md §5.1). Counted in elements, not tasks, so how the chunks pack
// into tasks does not decide it.
constexpr int64_t kMinParallelElements = 4 * kChunk;

struct Chunk {
  int64_t tensor;  // index in the list
  int64_t begin;   // first element (in memory order)
  int64_t size;    // number of elements
};

class Plan {
 public:
  // numels[i]: element count of tensor i.
  template <typename NumelOf>
  Plan(size_t n, NumelOf numel_of) : first_chunk_(n + 1, 0) {
    int64_t task_cost = 0;
    for (size_t i = 0; i < n; ++i) {
      first_chunk_[i] = static_cast<int64_t>(chunks_.size());
      const int64_t numel = numel_of(i);
      for (int64_t b = 0; b < numel; b += kChunk) {
        const int64_t size = std::min(kChunk, numel - b);
        if (task_cost == 0) task_begin_.push_back(static_cast<int64_t>(chunks_.size()));
        chunks_.push_back({static_cast<int64_t>(i), b, size});
        task_cost += size + kChunkOverhead;
        elements_ += size;
        if (task_cost >= kChunk) task_cost = 0;
      }
    }
    first_chunk_[n] = static_cast<int64_t>(chunks_.size());
    task_begin_.push_back(static_cast<int64_t>(chunks_.size()));
  }

  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // Chunks of tensor i are [first_chunk(i), first_chunk(i + 1)).
  int64_t first_chunk(size_t i) const { return first_chunk_[i]; }

  int64_t num_tasks() const { return static_cast<int64_t>(task_begin_.size()) - 1; }
  // Whether for_each_chunk() runs the tasks in a parallel region (else on the calling thread). Such a list has
  // at least 4 tasks: each closes once it holds kChunk of work.
  bool parallel() const { return elements_ >= kMinParallelElements; }

  // Calls f(chunk_index, chunk) for every chunk, in one parallel region.
  template <typename F>
  void for_each_chunk(const F& f) const {
    const int64_t tasks = num_tasks();
    if (tasks <= 0) return;
    auto run = [&](int64_t t0, int64_t t1) {
      for (int64_t c = task_begin_[t0]; c < task_begin_[t1]; ++c) f(c, chunks_[c]);
    };
    if (!parallel()) {
      run(0, tasks);
      return;
    }
    at::parallel_for(0, tasks, 1, run);
  }

 private:
  std::vector<Chunk> chunks_;
  std::vector<int64_t> task_begin_;  // task t is chunks [task_begin_[t], task_begin_[t + 1])
  std::vector<int64_t> first_chunk_;
  int64_t elements_ = 0;  // over the whole list
};

}  // namespace cpu
}  // namespace fastperturb
