// The op set: TORCH_LIBRARY(fastperturb) with the schemas of fastperturb's fused
// ops. The schema strings themselves (and what each op computes) are written
// down once in csrc/include/fastperturb/schemas.h, shared with the test build's
// work-list executor; fastperturb/ops/reference.py is the executable spec and
// docs/design.md §3 the contract.
#include <torch/library.h>

#include "fastperturb/schemas.h"

// The engine's helper ops (schemas.h, outside kAll; fastperturb/ops/names.py HELPER_OPS) are defined after the op set.
TORCH_LIBRARY(fastperturb, m) {
  for (const char* schema : fastperturb::schemas::kAll) m.def(schema);
  m.def(fastperturb::schemas::kAscentCoefficients);
}
