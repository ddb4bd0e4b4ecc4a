// torch.classes.fastperturb.TensorLists (common/tensor_lists.h) and the ops that take one instead of tensor
// lists. The handle ops compute exactly what the list ops of schemas.h compute; they read the lists by role:
// list 0 holds the tensors (params), list 1 their backups, list 2 the accumulators (absent lists are empty), and
// the gradients are the .grad of list 0. Their kernels are looked up by the handle's device type
// (common/handle_kernels.h): the CPU kernels (cpu/ops.cpp) and the CUDA work list (cuda/ops.cpp); the Triton
// backend takes the same handle from Python (fastperturb/ops/triton/impls.py).
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>

#include "common/handle_kernels.h"
#include "common/tensor_lists.h"
#include "fastperturb/list_schemas.h"

namespace fastperturb {
namespace {

// One table per device type; filled by static initialisers, read by every call.
std::array<HandleKernels, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& handle_table() {
  static std::array<HandleKernels, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> table{};
  return table;
}

}  // namespace

void register_handle_kernels(c10::DeviceType type, const HandleKernels& kernels) {
  handle_table()[static_cast<size_t>(type)] = kernels;
}

const HandleKernels* handle_kernels(c10::DeviceType type) {
  const HandleKernels& k = handle_table()[static_cast<size_t>(type)];
  return k.norms != nullptr ? &k : nullptr;
}

}  // namespace fastperturb

namespace {

const auto tensor_lists_class =
    torch::class_<fastperturb::TensorLists>("fastperturb", "TensorLists")
        .def(torch::init<std::vector<std::vector<at::Tensor>>, std::vector<std::string>, int64_t>())
        .def("size", &fastperturb::TensorLists::size)
        .def("num_lists", &fastperturb::TensorLists::num_lists)
        .def("current", &fastperturb::TensorLists::current)
        .def("serial", &fastperturb::TensorLists::serial)
        .def("fixed", &fastperturb::TensorLists::fixed)
        .def("list",
             [](const c10::intrusive_ptr<fastperturb::TensorLists>& self, int64_t k) {
               TORCH_CHECK_VALUE(k >= 0 && k < self->num_lists(), "list index ", k, " out of range");
               return self->list(static_cast<size_t>(k)).vec();
             })
        // The fingerprint of the lists whose bit (1 << k) is set in `mask`: one call however many lists.
        .def("check_mask", [](const c10::intrusive_ptr<fastperturb::TensorLists>& self, const std::string& op,
                              int64_t mask) { self->check_mask(op.c_str(), mask); })
        // TensorLists::enter: the checks of one op call of a backend with its own launch plan, the gradients'
        // pointers written into its pointer table (`table`, `code`: contiguous int64 CPU tensors), the version
        // bumps of what it will write; returns the table's status. One crossing per op call.
        .def("enter_grads",
             [](const c10::intrusive_ptr<fastperturb::TensorLists>& self, const std::string& op, int64_t check_mask,
                int64_t grads_k, const at::Tensor& table, const at::Tensor& code, int64_t bump_mask) {
               for (const at::Tensor* t : {&table, &code})
                 TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous(),
                                   "enter_grads: the pointer table and its codes must be contiguous int64 CPU tensors");
               TORCH_CHECK_VALUE(code.numel() == self->size(), "enter_grads: ", code.numel(), " codes for ",
                                 self->size(), " tensors");
               return self->enter(op.c_str(), check_mask, grads_k, table.data_ptr<int64_t>(), table.numel(),
                                  code.const_data_ptr<int64_t>(), bump_mask);
             })
        // The same without gradients.
        .def("enter",
             [](const c10::intrusive_ptr<fastperturb::TensorLists>& self, const std::string& op, int64_t check_mask,
                int64_t bump_mask) { self->enter(op.c_str(), check_mask, -1, nullptr, 0, nullptr, bump_mask); })
        // TensorLists::bump.
        .def("bump", [](const c10::intrusive_ptr<fastperturb::TensorLists>& self, int64_t mask) { self->bump(mask); })
        .def("grads_of",
             [](const c10::intrusive_ptr<fastperturb::TensorLists>& self, int64_t k, const std::string& op) {
               TORCH_CHECK_VALUE(k >= 0 && k < self->num_lists(), "list index ", k, " out of range");
               return self->grads_of(static_cast<size_t>(k), op.c_str());
             });

}  // namespace

// After the class: the schemas name it, so it must be registered first (same translation unit, so in order).
TORCH_LIBRARY_FRAGMENT(fastperturb, m) {
  for (const char* schema : fastperturb::schemas::kAllLists) m.def(schema);
}

// No list arguments to dispatch on (only the handle, and for ascent the coefficient tensors): one kernel per op
// serves every dispatch key and calls the kernel of the handle's device type.
namespace {

using fastperturb::Lists;

const fastperturb::HandleKernels& kernels_for(const char* op, const Lists& h) {
  const fastperturb::HandleKernels* k = fastperturb::handle_kernels(h->device().type());
  TORCH_CHECK_NOT_IMPLEMENTED(k != nullptr, "fastperturb::", op, " has no kernel for ", h->device().type(),
                              " tensors in this build of fastperturb");
  return *k;
}

std::tuple<at::Tensor, at::Tensor> norms_lists(const Lists& h, double ord, bool of_grads) {
  return kernels_for("norms_lists", h).norms(h, ord, of_grads);
}

at::Tensor grad_stats_lists(const Lists& h, bool with_accum, bool with_params, bool with_backups, double accum_weight,
                            bool accum_init, double adaptive_eta) {
  return kernels_for("grad_stats_lists_", h)
      .grad_stats(h, with_accum, with_params, with_backups, accum_weight, accum_init, adaptive_eta);
}

void ascent_step_lists(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                       bool first, double adaptive_eta, bool zero_grads) {
  kernels_for("ascent_step_lists_", h).ascent_step(h, step_coef, proj, norm, first, adaptive_eta, zero_grads);
}

void restore_lists(const Lists& h) { kernels_for("restore_lists_", h).restore(h); }

std::tuple<at::Tensor, at::Tensor> restore_norms_lists(const Lists& h, double ord) {
  return kernels_for("restore_norms_lists_", h).restore_norms(h, ord);
}

void combine_grads_lists(const Lists& h, double weight) {
  kernels_for("combine_grads_lists_", h).combine_grads(h, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastperturb, CompositeExplicitAutograd, m) {
  m.impl("norms_lists", &norms_lists);
  m.impl("grad_stats_lists_", &grad_stats_lists);
  m.impl("ascent_step_lists_", &ascent_step_lists);
  m.impl("restore_lists_", &restore_lists);
  m.impl("restore_norms_lists_", &restore_norms_lists);
  m.impl("combine_grads_lists_", &combine_grads_lists);
}
