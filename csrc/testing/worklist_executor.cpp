// The CPU executor of the CUDA work list: a test harness, built only into the
// test module fastperturb._C_testing (FASTPERTURB_BUILD_TESTING=1), never into
// fastperturb._C or the wheel. It registers the five fused ops a second time,
// as torch.ops.fastperturb_worklist.*, with the same schemas
// (fastperturb/schemas.h) and the same host code as the CUDA launcher
// (cuda/worklist_ops.h): the same plan, the same kernel arguments
// (LaunchArgs / FinalizeArgs), the same per-block loop and element functors
// (fastperturb/worklist/device.h). Each "launch" is walked block by block, each block
// as `lanes` emulated threads; the block's lanes are combined in lane order
// where the GPU uses cub::BlockReduce. This lets the CPU tests run everything
// the CUDA ops do except the kernels' thread indexing and the CUB reduction.
//
// The ops on a TensorLists handle (fastperturb/list_schemas.h) are registered
// here too, on the host code of the CUDA handle ops (cuda/worklist_list_ops.h),
// for handles on CPU tensors (fastperturb._C, which registers the handle class,
// is loaded first).
//
// Extra ops for the tests:
//   plan(...)       the launch/block layout the planner makes, for inspection;
//   configure(...)  the executor's chunk size, launch capacities, lanes and
//                   finalize capacity (0 = the CUDA value), returning the old;
//   capacity(depth) the CUDA geometry and kernel-argument capacities.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/handle_kernels.h"
#include "cuda/step_worklist_ops.h"
#include "cuda/worklist_list_ops.h"
#include "cuda/worklist_ops.h"
#include "fastperturb/list_schemas.h"
#include "fastperturb/schemas.h"
#include "fastperturb/worklist/device.h"
#include "fastperturb/worklist/plan.h"

namespace fastperturb {
namespace worklist {
namespace {

// 0 means "the CUDA value".
struct Config {
  int64_t chunk_size = 0;
  int64_t max_tensors = 0;
  int64_t max_blocks = 0;
  int64_t lanes = 0;
  int64_t finalize_tensors = 0;
};

std::mutex config_mutex;
Config config;

Config current_config() {
  std::lock_guard<std::mutex> lock(config_mutex);
  return config;
}

struct CpuExec {
  Config cfg;

  Limits limits(int depth) const {
    Limits l;
    const int cap = max_tensors_for_depth(depth);
    l.chunk_size = cfg.chunk_size > 0 ? cfg.chunk_size : kChunkSize;
    l.max_tensors = static_cast<int>(cfg.max_tensors > 0 ? std::min<int64_t>(cfg.max_tensors, cap) : cap);
    l.max_blocks = static_cast<int>(cfg.max_blocks > 0 ? std::min<int64_t>(cfg.max_blocks, kMaxBlocks) : kMaxBlocks);
    return l;
  }

  int finalize_tensors() const {
    return static_cast<int>(cfg.finalize_tensors > 0 ? cfg.finalize_tensors : kFinalizeTensors);
  }

  int lanes() const { return static_cast<int>(cfg.lanes > 0 ? cfg.lanes : kThreads); }

  // One launch of the main kernel: grid = n_blocks, `lanes` threads a block.
  template <class Op>
  void run(const LaunchArgs<Op::kDepth>& a, const Op& op, double* partials) const {
    const int nlanes = lanes();
    for (int b = 0; b < a.n_blocks; ++b) {
      wide_t<typename Op::Acc> total = widen(op.identity());
      for (int lane = 0; lane < nlanes; ++lane) {
        wide_t<typename Op::Acc> acc = widen(op.identity());
        run_block(a, b, op, lane, nlanes, acc);
        total = op.combine(total, acc);
      }
      if constexpr (Op::kSlots > 0) op.store(total, partials + (a.first_slot + b) * Op::kSlots);
    }
  }

  // One launch of the finalize kernel: grid = f.n, `lanes` threads a block.
  template <class F>
  void finalize(const FinalizeArgs& f, const F& fin) const {
    const int nlanes = lanes();
    for (int j = 0; j < f.n; ++j) {
      typename F::Acc total = fin.identity();
      for (int lane = 0; lane < nlanes; ++lane) {
        typename F::Acc acc = fin.identity();
        run_finalize(f, j, fin, lane, nlanes, acc);
        total = fin.combine(total, acc);
      }
      fin.store(f.index[j], total);
    }
  }
};

CpuExec executor() { return CpuExec{current_config()}; }

// The executor runs on CPU tensors only. Its ops are registered for CPU and for
// CompositeExplicitAutograd (which serves calls whose lists are all empty, so
// carry no dispatch key, and devices without a kernel of their own).
void require_cpu(const char* op, std::initializer_list<at::TensorList> lists,
                 std::initializer_list<const at::Tensor*> single = {}) {
  auto check = [op](const at::Tensor& t) {
    TORCH_CHECK_NOT_IMPLEMENTED(!t.defined() || t.device().is_cpu(), "fastperturb_worklist::", op,
                                " is the CPU executor of the CUDA work list; it runs on CPU tensors, not ",
                                t.device().type());
  };
  for (const auto& l : lists)
    for (const auto& t : l) check(t);
  for (const at::Tensor* t : single) check(*t);
}

std::tuple<at::Tensor, at::Tensor> norms_op(at::TensorList tensors, double ord) {
  require_cpu("norms", {tensors});
  checks::check_norms(tensors, ord);
  CpuExec ex = executor();
  return norms(ex, tensors, ord);
}

at::Tensor grad_stats_op(at::TensorList grads, at::TensorList accum, at::TensorList params, at::TensorList backups,
                         double accum_weight, bool accum_init, double adaptive_eta) {
  require_cpu("grad_stats_", {grads, accum, params, backups});
  checks::check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta);
  CpuExec ex = executor();
  return grad_stats(ex, grads, accum, params, backups, accum_weight, accum_init, adaptive_eta);
}

void ascent_step_op(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& step_coef,
                    const at::Tensor& proj, c10::string_view norm, bool first, double adaptive_eta, bool zero_grads) {
  require_cpu("ascent_step_", {params, grads, backups}, {&step_coef, &proj});
  checks::check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta, first, zero_grads);
  CpuExec ex = executor();
  ascent_step(ex, params, grads, backups, step_coef, proj, norm, first, adaptive_eta, zero_grads);
}

void restore_op(at::TensorList params, at::TensorList backups) {
  require_cpu("restore_", {params, backups});
  checks::check_restore(params, backups);
  CpuExec ex = executor();
  restore(ex, params, backups);
}

void combine_grads_op(at::TensorList grads, at::TensorList accum, double weight) {
  require_cpu("combine_grads_", {grads, accum});
  checks::check_combine_grads(grads, accum, weight);
  CpuExec ex = executor();
  combine_grads(ex, grads, accum, weight);
}

at::Tensor dot_stats_op(at::TensorList x, at::TensorList y) {
  require_cpu("dot_stats", {x, y});
  checks::check_dot_stats(x, y);
  CpuExec ex = executor();
  return dot_stats(ex, x, y);
}

at::Tensor lincomb_op(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coef) {
  require_cpu("lincomb_", {out, x, y}, {&coef});
  checks::check_lincomb(out, x, y, coef);
  CpuExec ex = executor();
  return lincomb(ex, out, x, y, coef);
}

at::Tensor ema_residual_op(at::TensorList grads, at::TensorList ema, at::TensorList params, double sigma, double lmbda,
                           bool init, double grad_scale, double adaptive_eta) {
  require_cpu("ema_residual_", {grads, ema, params});
  checks::check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta);
  CpuExec ex = executor();
  return ema_residual(ex, grads, ema, params, sigma, lmbda, init, grad_scale, adaptive_eta);
}

void restore_sgd_step_op(at::TensorList params, at::TensorList backups, at::TensorList grads,
                         at::TensorList momentum_buffers, double lr, double weight_decay, double momentum,
                         double dampening, bool nesterov, bool maximize, bool init_momentum) {
  require_cpu("restore_sgd_step_", {params, backups, grads, momentum_buffers});
  checks::check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening);
  CpuExec ex = executor();
  sgd_step(ex, params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize,
           init_momentum);
}

void restore_adam_step_op(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, double lr, double beta1,
                          double beta2, double eps, double step, double weight_decay, bool decoupled_weight_decay,
                          bool maximize) {
  require_cpu("restore_adam_step_", {params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  checks::check_restore_adam_step(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                                  step, weight_decay);
  CpuExec ex = executor();
  adam_step(ex, params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, step,
            weight_decay, decoupled_weight_decay, maximize);
}

// The ops on a handle.
void require_cpu_handle(const char* op, const Lists& h) {
  TORCH_CHECK_NOT_IMPLEMENTED(h->device().is_cpu(), "fastperturb_worklist::", op,
                              " is the CPU executor of the CUDA work list; it runs on CPU tensors, not ",
                              h->device().type());
}

std::tuple<at::Tensor, at::Tensor> norms_lists_op(const Lists& h, double ord, bool of_grads) {
  require_cpu_handle("norms_lists", h);
  CpuExec ex = executor();
  return norms_lists(ex, *h, ord, of_grads);
}

at::Tensor grad_stats_lists_op(const Lists& h, bool with_accum, bool with_params, bool with_backups,
                               double accum_weight, bool accum_init, double adaptive_eta) {
  require_cpu_handle("grad_stats_lists_", h);
  CpuExec ex = executor();
  return grad_stats_lists(ex, *h, with_accum, with_params, with_backups, accum_weight, accum_init, adaptive_eta);
}

void ascent_step_lists_op(const Lists& h, const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                          bool first, double adaptive_eta, bool zero_grads) {
  require_cpu_handle("ascent_step_lists_", h);
  CpuExec ex = executor();
  ascent_step_lists(ex, *h, step_coef, proj, norm, first, adaptive_eta, zero_grads);
}

void restore_lists_op(const Lists& h) {
  require_cpu_handle("restore_lists_", h);
  CpuExec ex = executor();
  restore_lists(ex, *h);
}

std::tuple<at::Tensor, at::Tensor> restore_norms_lists_op(const Lists& h, double ord) {
  require_cpu_handle("restore_norms_lists_", h);
  CpuExec ex = executor();
  return restore_norms_lists(ex, *h, ord);
}

void combine_grads_lists_op(const Lists& h, double weight) {
  require_cpu_handle("combine_grads_lists_", h);
  CpuExec ex = executor();
  combine_grads_lists(ex, *h, weight);
}

// The planner's layout: (tensors [R, 3] = launch, group, tensor index, one row
// per table entry; blocks [B, 7] = launch, entry, tensor index, chunk, slot,
// begin, end).
std::tuple<at::Tensor, at::Tensor> plan_op(std::vector<int64_t> numels, std::vector<int64_t> groups, int64_t chunk_size,
                                           int64_t max_tensors, int64_t max_blocks, int64_t depth) {
  TORCH_CHECK_VALUE(depth >= 1 && depth <= 4, "depth must be in [1, 4], got ", depth);
  TORCH_CHECK_VALUE(groups.empty() || groups.size() == numels.size(),
                    "groups must be empty or have one entry per tensor");
  std::vector<int> keys(numels.size(), 0);
  for (std::size_t i = 0; i < groups.size(); ++i) keys[i] = static_cast<int>(groups[i]);
  TORCH_CHECK_VALUE(max_tensors >= 1 && max_tensors <= 255 && max_blocks >= 1 && max_blocks <= kMaxBlocks,
                    "max_tensors or max_blocks out of range");
  Limits lim;
  lim.chunk_size = chunk_size;
  lim.max_tensors = static_cast<int>(max_tensors);
  lim.max_blocks = static_cast<int>(max_blocks);
  Plan plan;
  try {
    plan = make_plan(numels, keys, lim, static_cast<int>(depth));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::vector<int64_t> trows;
  std::vector<int64_t> brows;
  for (std::size_t l = 0; l < plan.launches.size(); ++l) {
    const PlannedLaunch& pl = plan.launches[l];
    for (int32_t i : pl.tensors) trows.insert(trows.end(), {static_cast<int64_t>(l), pl.group, i});
    for (std::size_t b = 0; b < pl.blocks.size(); ++b) {
      const int32_t i = pl.tensors[static_cast<std::size_t>(pl.blocks[b].entry)];
      const Range r = chunk_range(numels[static_cast<std::size_t>(i)], pl.blocks[b].chunk, plan.chunk_size);
      brows.insert(brows.end(), {static_cast<int64_t>(l), pl.blocks[b].entry, i, pl.blocks[b].chunk,
                                 pl.first_slot + static_cast<int64_t>(b), r.begin, r.end});
    }
  }
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor tensors = at::tensor(trows, i64).reshape({-1, 3});
  at::Tensor blocks = at::tensor(brows, i64).reshape({-1, 7});
  return {tensors, blocks};
}

std::vector<int64_t> configure_op(int64_t chunk_size, int64_t max_tensors, int64_t max_blocks, int64_t lanes,
                                  int64_t finalize_tensors) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be >= 0 (0: the CUDA value), got ", chunk_size);
  TORCH_CHECK_VALUE(max_tensors >= 0 && max_tensors <= 255, "max_tensors must be in [0, 255], got ", max_tensors);
  TORCH_CHECK_VALUE(max_blocks >= 0 && max_blocks <= kMaxBlocks, "max_blocks must be in [0, ", kMaxBlocks, "], got ",
                    max_blocks);
  TORCH_CHECK_VALUE(lanes >= 0 && lanes <= 4096, "lanes must be in [0, 4096], got ", lanes);
  TORCH_CHECK_VALUE(finalize_tensors >= 0 && finalize_tensors <= kFinalizeTensors, "finalize_tensors must be in [0, ",
                    kFinalizeTensors, "], got ", finalize_tensors);
  std::lock_guard<std::mutex> lock(config_mutex);
  const Config old = config;
  config = Config{chunk_size, max_tensors, max_blocks, lanes, finalize_tensors};
  return {old.chunk_size, old.max_tensors, old.max_blocks, old.lanes, old.finalize_tensors};
}

// [max_tensors, max_blocks, chunk_size, threads, finalize_tensors,
//  finalize_threads, vector bytes, sizeof(LaunchArgs<depth>), sizeof(FinalizeArgs)]
std::vector<int64_t> capacity_op(int64_t depth) {
  TORCH_CHECK_VALUE(depth >= 1 && depth <= 4, "depth must be in [1, 4], got ", depth);
  const int64_t args_bytes = depth == 1   ? sizeof(LaunchArgs<1>)
                             : depth == 2 ? sizeof(LaunchArgs<2>)
                             : depth == 3 ? sizeof(LaunchArgs<3>)
                                          : sizeof(LaunchArgs<4>);
  return {max_tensors_for_depth(static_cast<int>(depth)),
          kMaxBlocks,
          kChunkSize,
          kThreads,
          kFinalizeTensors,
          kFinalizeThreads,
          kVecBytes,
          args_bytes,
          static_cast<int64_t>(sizeof(FinalizeArgs))};
}

}  // namespace
}  // namespace worklist
}  // namespace fastperturb

TORCH_LIBRARY(fastperturb_worklist, m) {
  for (const char* schema : fastperturb::schemas::kAll) m.def(schema);
  for (const char* schema : fastperturb::schemas::kAllLists) m.def(schema);
  m.def(
      "plan(int[] numels, int[] groups, int chunk_size, int max_tensors, int max_blocks, int depth=1) "
      "-> (Tensor, Tensor)",
      &fastperturb::worklist::plan_op);
  m.def(
      "configure(int chunk_size=0, int max_tensors=0, int max_blocks=0, int lanes=0, int finalize_tensors=0) "
      "-> int[]",
      &fastperturb::worklist::configure_op);
  m.def("capacity(int depth) -> int[]", &fastperturb::worklist::capacity_op);
}

namespace {
void register_executor(torch::Library& m) {
  m.impl("norms", &fastperturb::worklist::norms_op);
  m.impl("grad_stats_", &fastperturb::worklist::grad_stats_op);
  m.impl("ascent_step_", &fastperturb::worklist::ascent_step_op);
  m.impl("restore_", &fastperturb::worklist::restore_op);
  m.impl("combine_grads_", &fastperturb::worklist::combine_grads_op);
  m.impl("dot_stats", &fastperturb::worklist::dot_stats_op);
  m.impl("lincomb_", &fastperturb::worklist::lincomb_op);
  m.impl("ema_residual_", &fastperturb::worklist::ema_residual_op);
  m.impl("restore_sgd_step_", &fastperturb::worklist::restore_sgd_step_op);
  m.impl("restore_adam_step_", &fastperturb::worklist::restore_adam_step_op);
  m.impl("norms_lists", &fastperturb::worklist::norms_lists_op);
  m.impl("grad_stats_lists_", &fastperturb::worklist::grad_stats_lists_op);
  m.impl("ascent_step_lists_", &fastperturb::worklist::ascent_step_lists_op);
  m.impl("restore_lists_", &fastperturb::worklist::restore_lists_op);
  m.impl("restore_norms_lists_", &fastperturb::worklist::restore_norms_lists_op);
  m.impl("combine_grads_lists_", &fastperturb::worklist::combine_grads_lists_op);
}
}  // namespace

TORCH_LIBRARY_IMPL(fastperturb_worklist, CPU, m) { register_executor(m); }
TORCH_LIBRARY_IMPL(fastperturb_worklist, CompositeExplicitAutograd, m) { register_executor(m); }
