// The schemas of the ops that take a TensorLists handle (csrc/common/tensor_lists.h) instead of tensor lists:
// the same computation as the list op of schemas.h of the same name without "_lists", on the handle's lists by
// role: list 0 = params (the `tensors` of norms), list 1 = backups, list 2 = accum; grads = the .grad of list 0.
// The flags say which optional lists an op reads (the list ops take them empty when absent). The handle ops are
// not in kAll: they are a call path for eager code (torch.compile traces the list ops); fastperturb/ops/names.py
// HANDLE_OPS follows kAllLists.
#pragma once

namespace fastperturb {
namespace schemas {

#define FASTPERTURB_LISTS "__torch__.torch.classes.fastperturb.TensorLists lists"

// of_grads: the norms of the params' .grad instead of the params (the check of the descent gradient).
inline constexpr const char* kNormsLists =
    "norms_lists(" FASTPERTURB_LISTS ", float ord, *, bool of_grads=False) -> (Tensor, Tensor)";

inline constexpr const char* kGradStatsLists =
    "grad_stats_lists_(" FASTPERTURB_LISTS
    ", *, bool with_accum, bool with_params, bool with_backups, "
    "float accum_weight=1.0, bool accum_init=False, float adaptive_eta=-1.0) -> Tensor";

inline constexpr const char* kAscentStepLists =
    "ascent_step_lists_(" FASTPERTURB_LISTS
    ", Tensor step_coef, Tensor proj, *, str norm=\"l2\", "
    "bool first=False, float adaptive_eta=-1.0, bool zero_grads=False) -> ()";

inline constexpr const char* kRestoreLists = "restore_lists_(" FASTPERTURB_LISTS ") -> ()";

// restore_lists_ and norms_lists(of_grads=True) in one pass (the restore before the check of the descent
// gradient): the params are restored whatever the norms are; a gradient the checks refuse restores nothing.
inline constexpr const char* kRestoreNormsLists =
    "restore_norms_lists_(" FASTPERTURB_LISTS ", float ord) -> (Tensor, Tensor)";

inline constexpr const char* kCombineGradsLists = "combine_grads_lists_(" FASTPERTURB_LISTS ", float weight) -> ()";

#undef FASTPERTURB_LISTS

inline constexpr const char* kAllLists[] = {kNormsLists,   kGradStatsLists,    kAscentStepLists,
                                            kRestoreLists, kRestoreNormsLists, kCombineGradsLists};

}  // namespace schemas
}  // namespace fastperturb
