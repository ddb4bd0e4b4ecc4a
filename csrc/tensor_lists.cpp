// torch.classes.fastperturb.TensorLists (common/tensor_lists.h) and the ops that take one instead of tensor
// lists. The handle ops compute exactly what the list ops of schemas.h compute; they read the lists by role:
// list 0 holds the tensors (params), list 1 their backups, list 2 the accumulators (absent lists are empty), and
// the gradients are the .grad of list 0. The CPU kernels are in cpu/ops.cpp; the Triton backend takes the same
// handle (fastperturb/ops/triton/impls.py).
#include <torch/custom_class.h>
#include <torch/library.h>

#include "common/tensor_lists.h"
#include "cpu/list_ops.h"
#include "fastperturb/list_schemas.h"

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

// The CPU kernels (cpu/ops.cpp). No list arguments to dispatch on (only the handle, and for ascent the coefficient
// tensors): one kernel serves every key, and refuses a handle whose tensors are not on the CPU.
TORCH_LIBRARY_IMPL(fastperturb, CompositeExplicitAutograd, m) {
  using namespace fastperturb::cpu;
  m.impl("norms_lists", &norms_lists);
  m.impl("grad_stats_lists_", &grad_stats_lists);
  m.impl("ascent_step_lists_", &ascent_step_lists);
  m.impl("restore_lists_", &restore_lists);
  m.impl("restore_norms_lists_", &restore_norms_lists);
  m.impl("combine_grads_lists_", &combine_grads_lists);
}
