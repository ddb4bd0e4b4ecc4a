// torch.ops.fastperturb_worklist.cpu_plan (the test harness's namespace): the CPU kernels' chunk plan
// (csrc/cpu/plan.h) over a list of tensor sizes, so tests can check how a list is cut and whether it runs
// on two threads without timing anything.
#include <torch/library.h>

#include <tuple>

#include "cpu/plan.h"

namespace {

// (chunks, tasks, parallel) of the plan over tensors of `numels` elements.
std::tuple<int64_t, int64_t, bool> cpu_plan_op(c10::IntArrayRef numels) {
  for (const int64_t n : numels) TORCH_CHECK_VALUE(n >= 0, "numels must be >= 0, got ", n);
  const fastperturb::cpu::Plan plan(numels.size(), [&](size_t i) { return numels[i]; });
  return {plan.num_chunks(), plan.num_tasks(), plan.parallel()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastperturb_worklist, m) { m.def("cpu_plan(int[] numels) -> (int, int, bool)", &cpu_plan_op); }
