// torch.classes.fastperturb.StepCounts: torch.optim.Adam's per-parameter `step` tensors, advanced in C++.
//
// torch keeps Adam's step count as one CPU scalar tensor per parameter and adds 1 to each before the update
// (`torch._foreach_add_(state_steps, 1)`). On CPU tensors that is one dispatched `add_` per tensor: 4.4 ms on a
// thousand parameters, a quarter of the fused base step (fastperturb/optim/fused_step.py) on them. Here the same
// additions are one call: each count is incremented in place, in its own dtype (float32 by default, as torch's
// add does it: the same value), its version counter bumped as `add_` bumps it, and the count they now share is
// returned (NaN when they differ, and the caller then reads them one by one).
//
// A tensor that is not a plain CPU float32/float64 scalar (another dtype, a subclass, an inference tensor, a view
// with the negative bit) takes the dispatched `add_`, which gives it torch's own behaviour and errors.
#include <torch/custom_class.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace fastperturb {
namespace {

class StepCounts : public torch::CustomClassHolder {
 public:
  explicit StepCounts(std::vector<at::Tensor> steps) : steps_(std::move(steps)) {
    for (const at::Tensor& t : steps_) {
      TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && t.device().is_cpu(),
                        "StepCounts: every step count must be a CPU tensor of one element");
    }
  }

  int64_t size() const { return static_cast<int64_t>(steps_.size()); }

  // Add 1 to every count; return the value they all have now, or NaN if they differ (or there are none).
  double advance() {
    double common = std::numeric_limits<double>::quiet_NaN();
    bool same = true;
    for (size_t i = 0; i < steps_.size(); ++i) {
      const double v = increment(steps_[i]);
      if (i == 0)
        common = v;
      else if (v != common)
        same = false;
    }
    return same ? common : std::numeric_limits<double>::quiet_NaN();
  }

 private:
  static bool plain(const at::Tensor& t) {
    const at::ScalarType dtype = t.scalar_type();
    return (dtype == at::kFloat || dtype == at::kDouble) && t.device().is_cpu() && t.layout() == at::kStrided &&
           t.numel() == 1 && t.has_storage() && !t.is_inference() && !t.is_neg() && !t._is_zerotensor() &&
           !t.unsafeGetTensorImpl()->is_python_dispatch() && !t.requires_grad();
  }

  static double increment(at::Tensor& t) {
    if (!plain(t)) {
      t.add_(1);
      return t.item<double>();
    }
    t.unsafeGetTensorImpl()->bump_version();
    if (t.scalar_type() == at::kFloat) {
      float* p = t.mutable_data_ptr<float>();
      *p += 1.0f;
      return *p;
    }
    double* p = t.mutable_data_ptr<double>();
    *p += 1.0;
    return *p;
  }

  std::vector<at::Tensor> steps_;
};

const auto step_counts_class = torch::class_<StepCounts>("fastperturb", "StepCounts")
                                   .def(torch::init<std::vector<at::Tensor>>())
                                   .def("size", &StepCounts::size)
                                   .def("advance", &StepCounts::advance);

}  // namespace
}  // namespace fastperturb
