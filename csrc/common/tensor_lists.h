// A persistent handle on a set of parallel tensor lists (torch.classes.fastperturb.TensorLists), so that an op
// called again and again on the same parameter list pays neither the list marshalling through torch.ops
// (about 0.1 us per tensor per list) nor the full argument checks nor the work plan on every call.
//
// The handle is validated once, when it is built, with the checks of the list ops (checks.h); it keeps the
// tensors alive (so their memory cannot be freed and reused behind it) and a fingerprint of each: data pointer,
// shape, strides, dtype, device. Every op call on the handle re-checks that fingerprint (a few ns per tensor):
// a tensor whose storage, shape or layout changed since (`p.data = ...`, `resize_`, `set_`) is refused with an
// error saying to build a new handle. A tensor *replaced* in the caller's list is a different list: the caller
// keys its handle on the identity of the tensors (fastperturb/ops/lists.py).
//
// Buffers only the caller holds (the optimizers' backups and accumulators, never handed out) cannot change behind
// it: the lists marked `fixed` at build time are fingerprinted then and not re-checked per call (about 7 us per
// list of 1000 tensors). List 0, the parameters, which users and frameworks do reassign, is always re-checked.
//
// Gradients are not part of the fingerprint: they are read from the `.grad` of a list's tensors on every call
// (they are replaced whenever a training loop sets them to None) and checked then, as the list ops check them.
// Any op can take a handle: it calls check(), reads lists with list(k) / grads_of(k), and reuses cpu_plan() (the
// CUDA work list: worklist_plan()). A
// backend that keeps launch plans of its own (Triton) makes one enter() per op call instead: checks, the
// gradients' pointers written into its plan, version bumps.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/impl_prefetch.h"
#include "cpu/plan.h"
#include "fastperturb/worklist/plan.h"

namespace fastperturb {

class TensorLists : public torch::CustomClassHolder {
 public:
  // lists[0] is the reference; every other list is empty (absent) or parallel to it. names[k] names list k in
  // error messages ("params", "backups", ...). Bit k of `fixed` marks list k fixed (above: checked here only).
  TensorLists(std::vector<std::vector<at::Tensor>> lists, std::vector<std::string> names, int64_t fixed = 0)
      : lists_(std::move(lists)), names_(std::move(names)), fixed_(fixed), serial_(next_serial()) {
    TORCH_CHECK_VALUE(!lists_.empty(), "TensorLists needs at least one list");
    TORCH_CHECK_VALUE(names_.size() == lists_.size(), "TensorLists got ", lists_.size(), " lists but ", names_.size(),
                      " names");
    TORCH_CHECK_VALUE(fixed_ >= 0 && (fixed_ & 1) == 0 && (lists_.size() >= 63 || fixed_ >> lists_.size() == 0),
                      "TensorLists: fixed mask ", fixed_, " must name lists 1..", lists_.size() - 1, " only (",
                      names_[0], " are re-checked on every call)");
    const at::TensorList ref = lists_[0];
    bool have_device = false;
    at::Device device(at::kCPU);
    for (size_t k = 0; k < lists_.size(); ++k) {
      checks::check_list(names_[k].c_str(), lists_[k]);
      if (k > 0) checks::check_parallel(names_[0].c_str(), ref, names_[k].c_str(), lists_[k], true);
      for (size_t i = 0; i < lists_[k].size(); ++i) {
        const at::Device d = lists_[k][i].device();
        if (!have_device) {
          have_device = true;
          device = d;
        }
        TORCH_CHECK_VALUE(d == device, names_[k], "[", i, "] is on ", d, " but the other tensors are on ", device,
                          "; move them to one device");
      }
    }
    device_ = device;
    // Every list is written by some op on a handle (params by the ascent and the restore, backups by the first
    // ascent, accum by the statistics pass), so no tensor of any list may share memory with another: the list ops
    // refuse it on every call, the handle ops rely on this check alone.
    std::vector<checks::NamedList> named;
    for (size_t k = 0; k < lists_.size(); ++k) named.push_back({names_[k].c_str(), lists_[k]});
    std::vector<const checks::NamedList*> all;
    for (const checks::NamedList& l : named) all.push_back(&l);
    checks::check_no_overlap(all, all.size());
    prints_.resize(lists_.size());
    for (size_t k = 0; k < lists_.size(); ++k)
      for (const at::Tensor& t : lists_[k]) prints_[k].push_back(print_of(t));
  }

  // Tensors per list.
  int64_t size() const { return static_cast<int64_t>(lists_[0].size()); }
  int64_t num_lists() const { return static_cast<int64_t>(lists_.size()); }
  // Whether list k was given (non-empty), or the lists are empty.
  bool has(size_t k) const { return k < lists_.size() && (!lists_[k].empty() || lists_[0].empty()); }
  at::TensorList list(size_t k) const { return k < lists_.size() ? at::TensorList(lists_[k]) : at::TensorList(); }
  const std::string& name(size_t k) const { return names_[k]; }
  at::Device device() const { return device_; }
  // A number no other handle of this process has (for caches kept outside the handle, e.g. the Triton plans).
  int64_t serial() const { return serial_; }

  // Every tensor of the lists `which` (default: all) still has the data pointer, shape, strides, dtype and device
  // it was built with.
  void check(const char* op, std::initializer_list<size_t> which) const {
    for (size_t k : which) check_list(op, k);
  }
  // The same for the lists whose bit (1 << k) is set in `mask`.
  void check_mask(const char* op, int64_t mask) const {
    for (size_t k = 0; k < lists_.size(); ++k)
      if (mask >> k & 1) check_list(op, k);
  }
  // Bit k set for the lists checked at build time only.
  int64_t fixed() const { return fixed_; }
  // Whether check() would pass for every list.
  bool current() const {
    for (size_t k = 0; k < lists_.size(); ++k)
      for (size_t i = 0; i < (fixed_ >> k & 1 ? 0 : prints_[k].size()); ++i)
        if (!matches(lists_[k][i], prints_[k][i])) return false;
    return true;
  }
  void check(const char* op) const {
    for (size_t k = 0; k < lists_.size(); ++k) check_list(op, k);
  }

  // The .grad of every tensor of list k, checked as the list ops check a gradient list parallel to it, against
  // the shape, strides, dtype and device list k had when the handle was built (what its plan was made for).
  std::vector<at::Tensor> grads_of(size_t k, const char* op) const {
    const at::TensorList ts = list(k);
    std::vector<at::Tensor> grads;
    grads.reserve(ts.size());
    for (size_t i = 0; i < ts.size(); ++i) grads.push_back(checked_grad(op, k, i));
    return grads;
  }

  // What a backend that keeps its own launch plan (the Triton one) does once per op call, in one C++ call: check()
  // the lists whose bit (1 << k) is set in `check_mask`; if `grads_k` >= 0, check the .grad of list grads_k's
  // tensors as grads_of() does and write their data pointers into the plan's pointer table, table[code[i] >> 1]
  // for every i with code[i] >= 0 (-1: the tensor has no row); then, everything checked, bump() `bump_mask`
  // (the caller launches right after: a rejected call leaves tables and counters alone). Bit 0 of code[i] says
  // the row's kernels assume a 16-byte aligned pointer. Returns 0 if the table already held every pointer, 1 if
  // some were written, 2 if a gradient breaks its row's alignment (the table is then unusable: build another).
  // The gradients are usually new tensors every step: rewriting their pointers is what keeps the plan.
  int64_t enter(const char* op, int64_t check_mask, int64_t grads_k, int64_t* table, int64_t table_len,
                const int64_t* code, int64_t bump_mask) const {
    const size_t n = lists_[0].size();
    for (size_t k = 0; k < lists_.size(); ++k)
      if (check_mask >> k & 1) check_list(op, k);
    int64_t status = 0;
    if (grads_k >= 0) {
      const size_t k = static_cast<size_t>(grads_k);
      TORCH_CHECK_INDEX(k < lists_.size() && lists_[k].size() == n, "enter: no list ", grads_k);
      std::vector<int64_t> grad_ptrs(n);
      for (size_t i = read_grads(k, grad_ptrs.data()); i < n; i = read_grads(k, grad_ptrs.data(), i + 1))
        grad_ptrs[i] = reinterpret_cast<int64_t>(checked_grad(op, k, i).data_ptr());  // (throws, or is fine)
      for (size_t i = 0; i < n; ++i) {
        const int64_t c = code[i];
        TORCH_CHECK_INDEX((c >> 1) < table_len, "pointer table position ", c >> 1, " out of range (", table_len, ")");
      }
      for (size_t i = 0; i < n; ++i) {
        const int64_t c = code[i], p = grad_ptrs[i];
        if (c < 0) continue;
        if ((c & 1) && (p & 15)) status = 2;
        int64_t& slot = table[c >> 1];
        if (slot != p) {
          slot = p;
          if (status == 0) status = 1;
        }
      }
    }
    bump(bump_mask);
    return status;
  }
  // The data pointers of the .grad of list k's tensors from `from` on, into ptrs, up to the first that fails the
  // fast checks (returned; n if none). In passes whose loads do not depend on each other across tensors, so that
  // they overlap: the chain from a parameter to its gradient's storage is five loads long (TensorImpl,
  // AutogradMeta, its vtable, the grad's TensorImpl, its StorageImpl), each a cache miss when walked one tensor
  // at a time.
  __attribute__((flatten)) size_t read_grads(size_t k, int64_t* ptrs, size_t from = 0) const {
    const std::vector<at::Tensor>& ts = lists_[k];
    const std::vector<Print>& ps = prints_[k];
    const size_t n = ts.size();
    std::vector<const c10::TensorImpl*> impls(n);
    for (size_t i = from; i < n; ++i) {
      prefetch::grad_links_ahead(ts, i);
      impls[i] = ts[i].unsafeGetTensorImpl()->grad().unsafeGetTensorImpl();
    }
    for (size_t i = from; i < n; ++i) {
      if (i + 2 * prefetch::kAhead < n) prefetch::impl(impls[i + 2 * prefetch::kAhead]);
      if (i + prefetch::kAhead < n) prefetch::storage(impls[i + prefetch::kAhead]);
      const c10::TensorImpl* g = impls[i];
      bool ok = g != c10::UndefinedTensorImpl::singleton() && g->layout() == at::kStrided &&
                same_layout(g, ps[i], grad_strides(g));
      if (ok) ptrs[i] = reinterpret_cast<int64_t>(data_of(g, ps[i].itemsize, ok));
      if (C10_UNLIKELY(!ok)) return i;
    }
    return n;
  }
  // The data pointer of each tensor of list k (null for an empty tensor), for an op that check()ed list k in this
  // call. A checked list's pointers are its fingerprint's, which the check found current, so no TensorImpl is read
  // again. A list checked at build time only (fixed()) is read where its tensors now are, in a pass that fetches
  // them ahead: its fingerprint is not verified, and a pointer kept from then could point at freed memory.
  std::vector<char*> data_ptrs(size_t k) const {
    const std::vector<Print>& ps = prints_[k];
    const size_t n = ps.size();
    std::vector<char*> out(n);
    if (!(fixed_ >> k & 1)) {
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<char*>(const_cast<void*>(ps[i].data));
      return out;
    }
    const std::vector<at::Tensor>& ts = lists_[k];
    for (size_t i = 0; i < n; ++i) {
      if (i + 2 * prefetch::kAhead < n) prefetch::impl(ts[i + 2 * prefetch::kAhead].unsafeGetTensorImpl());
      if (i + prefetch::kAhead < n) prefetch::storage(ts[i + prefetch::kAhead].unsafeGetTensorImpl());
      bool ok = true;
      void* p = data_of(ts[i].unsafeGetTensorImpl(), ps[i].itemsize, ok);
      out[i] = static_cast<char*>(ok ? p : ts[i].data_ptr());  // (data_ptr() says what is wrong)
    }
    return out;
  }
  std::vector<at::ScalarType> dtypes(size_t k) const {
    std::vector<at::ScalarType> out;
    out.reserve(prints_[k].size());
    for (const Print& p : prints_[k]) out.push_back(p.dtype);
    return out;
  }
  // The data pointers of the .grad of list k's tensors, checked as grads_of() checks them: read_grads() for every
  // gradient its fast checks pass, the full check (which throws, or passes) for any other. No tensor is copied,
  // so no reference count moves.
  std::vector<char*> grad_ptrs(size_t k, const char* op) const {
    const size_t n = lists_[k].size();
    std::vector<int64_t> raw(n);
    for (size_t i = read_grads(k, raw.data()); i < n; i = read_grads(k, raw.data(), i + 1))
      raw[i] = reinterpret_cast<int64_t>(checked_grad(op, k, i).data_ptr());
    std::vector<char*> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = reinterpret_cast<char*>(raw[i]);
    return out;
  }
  // Version-counter bumps after a backend outside C++ wrote the tensors: bit k of `mask` for list k, bit 16 + k
  // for the .grad of list k's tensors. A bump is a locked add, which waits for its counter's cache line and lets
  // nothing overlap it: the counters of a block of tensors are fetched first, together.
  void bump(int64_t mask) const {
    constexpr size_t kBlock = 64;
    c10::TensorImpl* impls[2 * kBlock];
    for (size_t k = 0; k < lists_.size(); ++k) {
      const bool tensors = mask >> k & 1, grads = mask >> (16 + k) & 1;
      if (!tensors && !grads) continue;
      const std::vector<at::Tensor>& ts = lists_[k];
      for (size_t start = 0; start < ts.size(); start += kBlock) {
        size_t m = 0;
        for (size_t i = start; i < std::min(ts.size(), start + kBlock); ++i) {
          c10::TensorImpl* t = ts[i].unsafeGetTensorImpl();
          if (tensors) impls[m++] = t;
          if (grads) {
            const at::Tensor& g = t->grad();
            if (g.defined()) impls[m++] = g.unsafeGetTensorImpl();
          }
        }
        for (size_t j = 0; j < m; ++j) prefetch::counter(impls[j], true);
        for (size_t j = 0; j < m; ++j) impls[j]->bump_version();
      }
    }
  }

  // The CPU work plan over list 0, built on first use.
  const cpu::Plan& cpu_plan() const {
    std::call_once(plan_once_, [this] {
      const at::TensorList ts = lists_[0];
      plan_ = std::make_unique<cpu::Plan>(ts.size(), [&](size_t i) { return ts[i].numel(); });
    });
    return *plan_;
  }

  // The work-list plan (fastperturb/worklist/plan.h: the CUDA kernels' launches) over list 0 for an op of `depth`
  // lists under the executor's limits `lim`: made by `make()` on first use, and again only when the limits differ
  // from the cached plan's (the test build's executor can be reconfigured). Shared, so a call keeps its plan alive.
  template <class Make>
  std::shared_ptr<const worklist::Plan> worklist_plan(int depth, const worklist::Limits& lim, Make&& make) const {
    TORCH_CHECK_INDEX(depth >= 1 && depth <= 4, "work list depth ", depth, " out of range");
    std::lock_guard<std::mutex> lock(worklist_mutex_);
    WorklistPlan& slot = worklist_plans_[static_cast<size_t>(depth - 1)];
    if (!slot.plan || !(slot.lim == lim)) {
      slot.plan = std::make_shared<const worklist::Plan>(make());
      slot.lim = lim;
    }
    return slot.plan;
  }

 private:
  // The end of the message for a tensor that no longer matches its fingerprint (after "op: list[i]").
  static constexpr const char* kChanged =
      "] changed since its TensorLists handle was built (data pointer, shape, strides, dtype or device; e.g. `.data` "
      "assigned or resized in place); build a new handle for the new tensors (fastperturb.ops.TensorLists)";
  // A tensor's fingerprint; its sizes and then its strides are shapes_[at .. at + 2 * dim).
  struct Print {
    const void* data;  // (null for an empty tensor)
    int64_t at;
    int64_t dim;
    int64_t itemsize;
    caffe2::TypeMeta meta;
    at::ScalarType dtype;
  };
  Print print_of(const at::Tensor& t) {
    Print p{t.data_ptr(), static_cast<int64_t>(shapes_.size()),
            t.dim(),      static_cast<int64_t>(t.element_size()),
            t.dtype(),    t.scalar_type()};
    shapes_.insert(shapes_.end(), t.sizes().begin(), t.sizes().end());
    shapes_.insert(shapes_.end(), t.strides().begin(), t.strides().end());
    return p;
  }
  at::IntArrayRef sizes_of(const Print& p) const { return {shapes_.data() + p.at, static_cast<size_t>(p.dim)}; }
  at::IntArrayRef strides_of(const Print& p) const {
    return {shapes_.data() + p.at + p.dim, static_cast<size_t>(p.dim)};
  }

  // The per-call checks run for every tensor of every call, so they read the TensorImpl and StorageImpl fields
  // directly, inlined (the at::Tensor accessors are out-of-line calls with checks of their own): about 6 ns a
  // tensor instead of 15 (1000 small tensors, one core of this machine). Whatever they do not pass goes to the
  // full checks, which name the problem.

  // How same_layout() compares strides: all of them (a tensor against its own fingerprint), those of the
  // dimensions whose size is not 1 (a gradient against its tensor: the same memory order, checks::same_memory_order),
  // or none (at most one element).
  enum class Strides { kExact, kOrder, kAny };
  // Whether `t` has the shape, dtype and device of `p`, and its strides as `mode` says.
  bool same_layout(const c10::TensorImpl* t, const Print& p, Strides mode) const {
    if (t->dtype() != p.meta || t->device() != device_) return false;
    const at::IntArrayRef sizes = t->sizes();
    if (static_cast<int64_t>(sizes.size()) != p.dim) return false;
    const int64_t* want = shapes_.data() + p.at;
    bool same = true;
    for (int64_t d = 0; d < p.dim; ++d) same &= sizes[d] == want[d];
    if (mode == Strides::kAny || !same) return same;
    const at::IntArrayRef strides = t->strides();
    const bool exact = mode == Strides::kExact;
    for (int64_t d = 0; d < p.dim; ++d) same &= strides[d] == want[p.dim + d] || (!exact && sizes[d] == 1);
    return same;
  }
  // The comparison of a gradient with its tensor's fingerprint.
  static Strides grad_strides(const c10::TensorImpl* g) { return g->numel() <= 1 ? Strides::kAny : Strides::kOrder; }
  // The data pointer of `t` as at::Tensor::data_ptr() has it (a copy-on-write storage materialised first), null
  // for an empty tensor; `ok` false if `t` has no storage (the full check then says why).
  static void* data_of(const c10::TensorImpl* t, int64_t itemsize, bool& ok) {
    c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl();
    if (C10_UNLIKELY(s == nullptr)) {
      ok = false;
      return nullptr;
    }
    char* base = static_cast<char*>(s->mutable_data());
    return t->numel() == 0 ? nullptr : base + itemsize * t->storage_offset();
  }
  bool fast_matches(const at::Tensor& t, const Print& p) const {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    bool ok = true;
    return same_layout(impl, p, Strides::kExact) && data_of(impl, p.itemsize, ok) == p.data && ok;
  }
  bool matches(const at::Tensor& t, const Print& p) const {
    return fast_matches(t, p) || (t.data_ptr() == p.data && t.scalar_type() == p.dtype && t.sizes() == sizes_of(p) &&
                                  t.strides() == strides_of(p) && t.device() == device_);
  }
  // The first tensor of list k that fails fast_matches() (n if none): the loop of every call, flattened so that
  // the TensorImpl accessors it calls are inlined too.
  __attribute__((flatten)) size_t first_changed(size_t k) const {
    const std::vector<at::Tensor>& ts = lists_[k];
    const std::vector<Print>& ps = prints_[k];
    const size_t n = ps.size();
    for (size_t i = 0; i < n; ++i) {
      if (i + 2 * prefetch::kAhead < n) prefetch::impl(ts[i + 2 * prefetch::kAhead].unsafeGetTensorImpl());
      if (i + prefetch::kAhead < n) prefetch::storage(ts[i + prefetch::kAhead].unsafeGetTensorImpl());
      if (C10_UNLIKELY(!fast_matches(ts[i], ps[i]))) return i;
    }
    return n;
  }
  void check_list(const char* op, size_t k) const {
    if (k >= lists_.size() || fixed_ >> k & 1) return;
    const size_t n = prints_[k].size();
    for (size_t i = first_changed(k); i < n; ++i)
      TORCH_CHECK_VALUE(matches(lists_[k][i], prints_[k][i]), op, ": ", names_[k], "[", i, kChanged);
  }
  // The .grad of lists_[k][i], checked as grads_of() says.
  const at::Tensor& checked_grad(const char* op, size_t k, size_t i) const {
    const at::Tensor& t = lists_[k][i];
    const Print& pt = prints_[k][i];
    const at::Tensor& g = t.unsafeGetTensorImpl()->grad();  // (no non-leaf warning: these are leaves or shards)
    // The common case in one pass over the TensorImpl; the checks below name what is wrong otherwise.
    const c10::TensorImpl* gi = g.unsafeGetTensorImpl();
    if (C10_LIKELY(g.defined() && gi->layout() == at::kStrided && same_layout(gi, pt, grad_strides(gi)))) return g;
    // The gradient is compared with the tensor as the handle saw it: a tensor changed since then is named as such
    // (the messages below print the tensor's own shape and dtype, which would then equal the gradient's).
    TORCH_CHECK_VALUE(matches(t, pt), op, ": ", names_[k], "[", i, kChanged);
    TORCH_CHECK_TYPE(g.defined(), op, ": ", names_[k], "[", i, "].grad is None; run backward first");
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, op, ": ", names_[k], "[", i, "].grad is a ",
                     checks::layout_name(g.layout()), " tensor; only dense (strided) tensors are supported");
    TORCH_CHECK_VALUE(g.sizes() == sizes_of(pt), op, ": ", names_[k], "[", i, "].grad has shape ",
                      checks::tuple_str(g.sizes()), " but ", names_[k], "[", i, "] has shape ",
                      checks::tuple_str(t.sizes()));
    TORCH_CHECK_TYPE(g.scalar_type() == pt.dtype, op, ": ", names_[k], "[", i, "].grad has dtype ",
                     checks::dtype_name(g.scalar_type()), " but ", names_[k], "[", i, "] has dtype ",
                     checks::dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(checks::same_memory_order(g.sizes(), g.strides(), strides_of(pt)), op, ": ", names_[k], "[", i,
                      "].grad has strides ", checks::tuple_str(g.strides()), " but ", names_[k], "[", i,
                      "] has strides ", checks::tuple_str(t.strides()), "; use the same memory format");
    TORCH_CHECK_VALUE(g.device() == device_, op, ": ", names_[k], "[", i, "].grad is on ", g.device(), " but ",
                      names_[k], "[", i, "] is on ", t.device());
    return g;
  }
  static int64_t next_serial() {
    static std::atomic<int64_t> counter{0};
    return ++counter;
  }

  std::vector<std::vector<at::Tensor>> lists_;
  std::vector<std::string> names_;
  int64_t fixed_;
  std::vector<std::vector<Print>> prints_;
  std::vector<int64_t> shapes_;
  at::Device device_{at::kCPU};
  int64_t serial_;
  mutable std::once_flag plan_once_;
  mutable std::unique_ptr<cpu::Plan> plan_;
  struct WorklistPlan {
    worklist::Limits lim;
    std::shared_ptr<const worklist::Plan> plan;
  };
  mutable std::mutex worklist_mutex_;
  mutable std::array<WorklistPlan, 4> worklist_plans_;
};

}  // namespace fastperturb
