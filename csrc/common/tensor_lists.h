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
// Gradients are not part of the fingerprint: they are read from the `.grad` of a list's tensors on every call
// (they are replaced whenever a training loop sets them to None) and checked then, as the list ops check them.
// Any op can take a handle: it calls check(), reads lists with list(k) / grads_of(k), and reuses cpu_plan().
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "common/checks.h"
#include "cpu/plan.h"

namespace fastperturb {

class TensorLists : public torch::CustomClassHolder {
 public:
  // lists[0] is the reference; every other list is empty (absent) or parallel to it. names[k] names list k in
  // error messages ("params", "backups", ...).
  TensorLists(std::vector<std::vector<at::Tensor>> lists, std::vector<std::string> names)
      : lists_(std::move(lists)), names_(std::move(names)), serial_(next_serial()) {
    TORCH_CHECK_VALUE(!lists_.empty(), "TensorLists needs at least one list");
    TORCH_CHECK_VALUE(names_.size() == lists_.size(), "TensorLists got ", lists_.size(), " lists but ", names_.size(),
                      " names");
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
  // Bumped whenever grads_of() sees a gradient with another data pointer than the previous call did: a plan that
  // holds gradient pointers (Triton) is rebuilt then.
  int64_t grads_generation() const { return grads_generation_.load(); }

  // Every tensor of the lists `which` (default: all) still has the data pointer, shape, strides, dtype and device
  // it was built with.
  void check(const char* op, std::initializer_list<size_t> which) const {
    for (size_t k : which) {
      if (k >= lists_.size()) continue;
      const std::vector<Print>& ps = prints_[k];
      for (size_t i = 0; i < ps.size(); ++i) {
        const at::Tensor& t = lists_[k][i];
        TORCH_CHECK_VALUE(ps[i].matches(t), op, ": ", names_[k], "[", i,
                          "] changed since its TensorLists handle was built (data pointer, shape, strides, dtype or "
                          "device; e.g. `.data` assigned or resized in place); build a new handle for the new tensors "
                          "(fastperturb.ops.TensorLists)");
      }
    }
  }
  // Whether check() would pass for every list.
  bool current() const {
    for (size_t k = 0; k < lists_.size(); ++k)
      for (size_t i = 0; i < prints_[k].size(); ++i)
        if (!prints_[k][i].matches(lists_[k][i])) return false;
    return true;
  }
  void check(const char* op) const {
    for (size_t k = 0; k < lists_.size(); ++k) check(op, {k});
  }

  // The .grad of every tensor of list k, checked as the list ops check a gradient list parallel to it, against
  // the shape, strides, dtype and device list k had when the handle was built (what its plan was made for).
  // `keep`: return them (else only check them and update grads_generation()).
  std::vector<at::Tensor> grads_of(size_t k, const char* op, bool keep = true) {
    const at::TensorList ts = list(k);
    const std::vector<Print>& ps = prints_[k];
    std::vector<at::Tensor> grads;
    if (keep) grads.reserve(ts.size());
    bool moved = grad_ptrs_.size() != ts.size();
    if (moved) grad_ptrs_.assign(ts.size(), nullptr);
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      const Print& pt = ps[i];
      const at::Tensor& g = t.unsafeGetTensorImpl()->grad();  // (no non-leaf warning: these are leaves or shards)
      TORCH_CHECK_TYPE(g.defined(), op, ": ", names_[k], "[", i, "].grad is None; run backward first");
      TORCH_CHECK_TYPE(g.layout() == at::kStrided, op, ": ", names_[k], "[", i, "].grad is a ",
                       checks::layout_name(g.layout()), " tensor; only dense (strided) tensors are supported");
      TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef(pt.sizes), op, ": ", names_[k], "[", i, "].grad has shape ",
                        checks::tuple_str(g.sizes()), " but ", names_[k], "[", i, "] has shape ",
                        checks::tuple_str(t.sizes()));
      TORCH_CHECK_TYPE(g.scalar_type() == pt.dtype, op, ": ", names_[k], "[", i, "].grad has dtype ",
                       checks::dtype_name(g.scalar_type()), " but ", names_[k], "[", i, "] has dtype ",
                       checks::dtype_name(t.scalar_type()));
      TORCH_CHECK_VALUE(g.numel() <= 1 || g.strides() == at::IntArrayRef(pt.strides), op, ": ", names_[k], "[", i,
                        "].grad has strides ", checks::tuple_str(g.strides()), " but ", names_[k], "[", i,
                        "] has strides ", checks::tuple_str(t.strides()), "; use the same memory format");
      TORCH_CHECK_VALUE(g.device() == pt.device, op, ": ", names_[k], "[", i, "].grad is on ", g.device(), " but ",
                        names_[k], "[", i, "] is on ", t.device());
      const void* p = g.data_ptr();
      if (grad_ptrs_[i] != p) {
        grad_ptrs_[i] = p;
        moved = true;
      }
      if (keep) grads.push_back(g);
    }
    if (moved) ++grads_generation_;
    return grads;
  }

  // The CPU work plan over list 0, built on first use.
  const cpu::Plan& cpu_plan() const {
    std::call_once(plan_once_, [this] {
      const at::TensorList ts = lists_[0];
      plan_ = std::make_unique<cpu::Plan>(ts.size(), [&](size_t i) { return ts[i].numel(); });
    });
    return *plan_;
  }

 private:
  struct Print {
    const void* data;
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype;
    at::Device device;
    bool matches(const at::Tensor& t) const {
      return t.data_ptr() == data && t.scalar_type() == dtype && t.sizes() == at::IntArrayRef(sizes) &&
             t.strides() == at::IntArrayRef(strides) && t.device() == device;
    }
  };
  static Print print_of(const at::Tensor& t) {
    return {t.data_ptr(), t.sizes().vec(), t.strides().vec(), t.scalar_type(), t.device()};
  }
  static int64_t next_serial() {
    static std::atomic<int64_t> counter{0};
    return ++counter;
  }

  std::vector<std::vector<at::Tensor>> lists_;
  std::vector<std::string> names_;
  std::vector<std::vector<Print>> prints_;
  at::Device device_{at::kCPU};
  int64_t serial_;
  std::vector<const void*> grad_ptrs_;
  std::atomic<int64_t> grads_generation_{0};
  mutable std::once_flag plan_once_;
  mutable std::unique_ptr<cpu::Plan> plan_;
};

}  // namespace fastperturb
