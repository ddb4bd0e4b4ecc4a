// The CPU kernels of the ops on a TensorLists handle (schemas: fastperturb/list_schemas.h), defined in
// cpu/ops.cpp beside the list ops they share their work with, registered by csrc/tensor_lists.cpp (after the
// class their schemas name: static registration order is only defined within one translation unit).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/tensor_lists.h"

namespace fastperturb {
namespace cpu {

using Lists = c10::intrusive_ptr<TensorLists>;

std::tuple<at::Tensor, at::Tensor> norms_lists(const Lists& h, double ord, bool of_grads);
at::Tensor grad_stats_lists(const Lists& h, bool with_accum, bool with_params, bool with_backups, double accum_weight,
                            bool accum_init, double adaptive_eta);
void ascent_step_lists(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                       bool first, double adaptive_eta, bool zero_grads);
void restore_lists(const Lists& h);
std::tuple<at::Tensor, at::Tensor> restore_norms_lists(const Lists& h, double ord);
void combine_grads_lists(const Lists& h, double weight);

}  // namespace cpu
}  // namespace fastperturb
