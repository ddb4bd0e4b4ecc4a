// The kernels of the ops on a TensorLists handle, by device type. A handle's ops take no tensor to dispatch on
// (only the handle, and for ascent_step_lists_ the coefficient tensors), so torch's dispatcher cannot pick the
// device: tensor_lists.cpp registers one CompositeExplicitAutograd kernel per op that looks up the handle's
// device type here. Each backend registers its table from a static initialiser (the CPU kernels always; the
// CUDA work list when the CUDA sources are built in).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <tuple>

#include "common/tensor_lists.h"

namespace fastperturb {

using Lists = c10::intrusive_ptr<TensorLists>;

struct HandleKernels {
  std::tuple<at::Tensor, at::Tensor> (*norms)(const Lists& h, double ord, bool of_grads);
  at::Tensor (*grad_stats)(const Lists& h, bool with_accum, bool with_params, bool with_backups, double accum_weight,
                           bool accum_init, double adaptive_eta);
  void (*ascent_step)(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                      bool first, double adaptive_eta, bool zero_grads);
  void (*restore)(const Lists& h);
  std::tuple<at::Tensor, at::Tensor> (*restore_norms)(const Lists& h, double ord);
  void (*combine_grads)(const Lists& h, double weight);
};

// Defined in tensor_lists.cpp. Registering a device type twice replaces its table.
void register_handle_kernels(c10::DeviceType type, const HandleKernels& kernels);
// The table of `type`, or null if no backend of this build runs handles on it.
const HandleKernels* handle_kernels(c10::DeviceType type);

}  // namespace fastperturb
