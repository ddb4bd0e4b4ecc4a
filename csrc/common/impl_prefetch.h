// Software prefetches for walks over many tensors' metadata (TensorLists' per-call checks, GradWatch's looks at
// the gradients). Such a walk is bound by the latency of chains of loads per tensor (TensorImpl, its AutogradMeta,
// the gradient's TensorImpl, its StorageImpl or version counter), scattered on the heap and out of cache after a
// backward pass; fetching the links of the tensors a few places ahead overlaps those chains.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>

#include <cstddef>
#include <vector>

namespace fastperturb {
namespace prefetch {

// How many tensors ahead a walk fetches each link (the earlier link twice as far ahead).
constexpr size_t kAhead = 8;

// The fields the checks read span the first sizeof(TensorImpl) bytes (storage, sizes and strides, offset, dtype,
// device, flags), which start anywhere in a cache line: the lines of both ends and those between.
inline void impl(const c10::TensorImpl* t) {
  const char* p = reinterpret_cast<const char*>(t);
  for (size_t at = 0; at < sizeof(c10::TensorImpl); at += 64) __builtin_prefetch(p + at);
  __builtin_prefetch(p + sizeof(c10::TensorImpl) - 1);
}

// The AutogradMeta of `t` (which holds its .grad), if it has one.
inline void meta(const c10::TensorImpl* t) {
  const char* m = reinterpret_cast<const char*>(t->autograd_meta());
  if (m != nullptr) {
    __builtin_prefetch(m);
    __builtin_prefetch(m + 64);
  }
}

// The version counter of `t`, for writing (a bump) or reading.
inline void counter(const c10::TensorImpl* t, bool for_write) {
  // (a VariableVersion is one intrusive_ptr to the counter)
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion is not one pointer");
  const void* c = *reinterpret_cast<const void* const*>(&t->version_counter());
  if (c == nullptr) return;
  if (for_write)
    __builtin_prefetch(c, 1);
  else
    __builtin_prefetch(c);
}

// Both ends of the StorageImpl of `t` (its data pointer and flags).
inline void storage(const c10::TensorImpl* t) {
  const char* s = reinterpret_cast<const char*>(t->unsafe_storage().unsafeGetStorageImpl());
  __builtin_prefetch(s);
  __builtin_prefetch(s + 63);
}

// While at tensor i of `ts`, the tensors ahead on the way to their `.grad`: the TensorImpl of the one 2 * kAhead
// ahead, and the AutogradMeta of the one kAhead ahead (whose TensorImpl was fetched kAhead tensors earlier).
inline void grad_links_ahead(const std::vector<at::Tensor>& ts, size_t i) {
  const size_t n = ts.size();
  if (i + 2 * kAhead < n) __builtin_prefetch(ts[i + 2 * kAhead].unsafeGetTensorImpl());
  if (i + kAhead < n) meta(ts[i + kAhead].unsafeGetTensorImpl());
}

}  // namespace prefetch
}  // namespace fastperturb
