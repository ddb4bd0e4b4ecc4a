// Helpers shared by the CPU op files (ops.cpp, family_ops.cpp, step_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <vector>

#include "cpu/plan.h"

namespace fastperturb {
namespace cpu {

// Address of element `offset` (in memory order) of a dense tensor. Dense tensors may be non-contiguous
// (channels_last): the lists of one op share strides (checked), so walking each one's memory block in order
// pairs up the same elements.
inline char* elem_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.data_ptr()) + offset * static_cast<int64_t>(t.element_size());
}

// Where the chunks of an op find their elements: the base data pointer of each tensor of a list (null for an
// empty tensor), and each tensor's dtype, which the op's lists share (checked). Read once per call, before the
// parallel region. Dense tensors may be non-contiguous (channels_last): see elem_ptr.
using Bases = std::vector<char*>;
using Dtypes = std::vector<at::ScalarType>;

inline Bases bases_of(at::TensorList ts) {
  Bases out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) out.push_back(static_cast<char*>(t.data_ptr()));
  return out;
}

inline Dtypes dtypes_of(at::TensorList ts) {
  Dtypes out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) out.push_back(t.scalar_type());
  return out;
}

// Address of a chunk's first element in list `b`, whose tensors have the chunk's dtype `t`.
inline char* chunk_ptr(const Bases& b, at::ScalarType t, const Chunk& ch) {
  return b[static_cast<size_t>(ch.tensor)] + ch.begin * static_cast<int64_t>(c10::elementSize(t));
}

// The chunk plan over a list (plan.h).
inline Plan plan_over(at::TensorList ts) {
  return Plan(ts.size(), [&](size_t i) { return ts[i].numel(); });
}

// Calls with only empty lists carry no tensor, so the dispatcher has no key to pick a kernel by; it then runs
// the CompositeExplicitAutograd kernel, which also serves any device that has no kernel of its own. Those
// wrappers run the CPU kernel after this check that every tensor is a CPU tensor.
inline void require_cpu(const char* op, std::initializer_list<at::TensorList> lists,
                        std::initializer_list<const at::Tensor*> single = {}) {
  auto check = [op](const at::Tensor& t) {
    TORCH_CHECK_NOT_IMPLEMENTED(!t.defined() || t.device().is_cpu(), "fastperturb::", op, " has no kernel for ",
                                t.device().type(), " tensors in this build of fastperturb");
  };
  for (const auto& l : lists)
    for (const auto& t : l) check(t);
  for (const at::Tensor* t : single) check(*t);
}

}  // namespace cpu
}  // namespace fastperturb
