// torch.classes.fastperturb.GradWatch: the `.grad` of a fixed list of parameters, read and cleared in C++.
//
// An optimizer step looks at every parameter's gradient several times: whether a backward ran since the last step
// (the caller's g_0), whether each pass's backward ran, clearing the gradients before a pass. In Python each look
// is an attribute read per parameter (~0.1-0.2 us each, and a version read on top): on a thousand parameters the
// looks cost about a millisecond per step, more than the fused ops of a SAM cycle on them. Here each is one call.
//
// The semantics are those of the Python loops they replace (fastperturb/optim/wrapper.py): a gradient "changed"
// when it is defined and is another tensor than the one remembered, or the same tensor with another version
// (a backward either stores a fresh tensor after `.grad = None` or accumulates into the old one in place).
// Remembered gradients are held by weak references: a gradient the caller drops between steps (model.zero_grad(),
// as Hugging Face's Trainer calls it after every step) frees its memory at once, while its TensorImpl, which the
// weak reference keeps allocated, keeps its address from being reused by a new gradient, so "another tensor" is
// still told by address. forget() drops them.
//
// Plain tensors only: a sharded (DTensor) gradient moves the version of its local tensor, which the Python path
// reads (fastperturb.distributed.local). The wrapper uses this class only on unsharded parameters.
//
// Each look walks the parameters in two passes: the first finds every `.grad` (parameter, AutogradMeta, gradient:
// a chain of loads per parameter, out of cache after a backward), the second reads or changes the gradients, with
// the links of the parameters a few places ahead fetched meanwhile (common/impl_prefetch.h).
#include <torch/custom_class.h>

#include <cstdint>
#include <vector>

#include "common/impl_prefetch.h"

namespace fastperturb {
namespace {

class GradWatch : public torch::CustomClassHolder {
 public:
  explicit GradWatch(std::vector<at::Tensor> params) : params_(std::move(params)) {}

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // How many parameters have a gradient.
  int64_t count_defined() const {
    int64_t n = 0;
    for (const at::Tensor* g : grads()) n += g->defined();
    return n;
  }

  // Every `.grad` = None (what `zero_grad(set_to_none=True)` does per parameter).
  void release() {
    const size_t n = params_.size();
    std::vector<at::Tensor*> gs(n);
    for (size_t i = 0; i < n; ++i) {
      prefetch::grad_links_ahead(params_, i);
      gs[i] = &params_[i].unsafeGetTensorImpl()->mutable_grad();
    }
    for (size_t i = 0; i < n; ++i) {
      // the reset decrements the gradient's reference count, in its TensorImpl
      if (i + prefetch::kAhead < n) __builtin_prefetch(gs[i + prefetch::kAhead]->unsafeGetTensorImpl(), 1);
      gs[i]->reset();
    }
  }

  // Remember every gradient and its version, in snapshot `slot` (kSlots independent ones: a step's "since the last
  // step" and a pass's "since before this pass" overlap).
  void snapshot(int64_t slot) {
    std::vector<Seen>& seen = slot_(slot);
    seen.clear();
    seen.reserve(params_.size());
    const std::vector<const at::Tensor*> gs = grads();
    for (size_t i = 0; i < gs.size(); ++i) {
      fetch_version(gs, i);
      const at::Tensor& g = *gs[i];
      seen.push_back({WeakImpl(g.getIntrusivePtr()), g.defined() ? static_cast<int64_t>(g._version()) : -1});
    }
  }

  // Set to None every gradient that is still the tensor snapshot(slot) saw, at the same version: one that no
  // backward wrote since (zeroed in place before a pass the backward of which did not reach it). How many.
  int64_t release_unchanged(int64_t slot) {
    if (!has_snapshot(slot)) return 0;
    const std::vector<Seen>& seen = slot_(slot);
    int64_t n = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor& g = params_[i].unsafeGetTensorImpl()->mutable_grad();
      if (g.defined() && seen[i].grad._unsafe_get_target() == g.unsafeGetTensorImpl() &&
          static_cast<int64_t>(g._version()) == seen[i].version) {
        g.reset();
        ++n;
      }
    }
    return n;
  }

  // Drop the remembered gradients (hold none while a pass may free them).
  void forget(int64_t slot) { std::vector<Seen>().swap(slot_(slot)); }

  bool has_snapshot(int64_t slot) const { return !params_.empty() && slot_(slot).size() == params_.size(); }

  // Whether any gradient changed since snapshot(slot) (false without a snapshot).
  bool changed(int64_t slot) const {
    if (!has_snapshot(slot)) return false;
    const std::vector<Seen>& seen = slot_(slot);
    const std::vector<const at::Tensor*> gs = grads();
    for (size_t i = 0; i < gs.size(); ++i) {
      fetch_version(gs, i);
      const at::Tensor& g = *gs[i];
      if (!g.defined()) continue;
      if (seen[i].grad._unsafe_get_target() != g.unsafeGetTensorImpl() ||
          static_cast<int64_t>(g._version()) != seen[i].version)
        return true;
    }
    return false;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Seen {
    WeakImpl grad;  // UndefinedTensorImpl's singleton: there was none
    int64_t version;
  };
  static constexpr int64_t kSlots = 2;
  std::vector<Seen>& slot_(int64_t k) {
    TORCH_CHECK_VALUE(k >= 0 && k < kSlots, "GradWatch: snapshot slot ", k, " out of range");
    return seen_[k];
  }
  const std::vector<Seen>& slot_(int64_t k) const { return const_cast<GradWatch*>(this)->slot_(k); }

  // The `.grad` of every parameter (undefined where there is none), in order. The parameters are leaves
  // (torch.optim refuses others), so no non-leaf warning is due.
  std::vector<const at::Tensor*> grads() const {
    std::vector<const at::Tensor*> gs(params_.size());
    for (size_t i = 0; i < gs.size(); ++i) {
      prefetch::grad_links_ahead(params_, i);
      gs[i] = &params_[i].unsafeGetTensorImpl()->grad();
    }
    return gs;
  }
  // While at gradient i, the gradients ahead: their TensorImpl, then their version counter.
  static void fetch_version(const std::vector<const at::Tensor*>& gs, size_t i) {
    const size_t n = gs.size();
    if (i + 2 * prefetch::kAhead < n) __builtin_prefetch(gs[i + 2 * prefetch::kAhead]->unsafeGetTensorImpl());
    if (i + prefetch::kAhead < n && gs[i + prefetch::kAhead]->defined())
      prefetch::counter(gs[i + prefetch::kAhead]->unsafeGetTensorImpl(), false);
  }

  std::vector<at::Tensor> params_;
  std::vector<Seen> seen_[kSlots];
};

const auto grad_watch_class = torch::class_<GradWatch>("fastperturb", "GradWatch")
                                  .def(torch::init<std::vector<at::Tensor>>())
                                  .def("size", &GradWatch::size)
                                  .def("count_defined", &GradWatch::count_defined)
                                  .def("release", &GradWatch::release)
                                  .def("release_unchanged", &GradWatch::release_unchanged)
                                  .def("snapshot", &GradWatch::snapshot)
                                  .def("forget", &GradWatch::forget)
                                  .def("has_snapshot", &GradWatch::has_snapshot)
                                  .def("changed", &GradWatch::changed);

}  // namespace
}  // namespace fastperturb
