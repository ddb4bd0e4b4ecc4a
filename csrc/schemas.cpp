// The op set: TORCH_LIBRARY(fastperturb) with the schemas of fastperturb's fused
// ops. The schema strings themselves (and what each op computes) are written
// down once in csrc/include/fastperturb/schemas.h, shared with the work-list
// executor's namespace; fastperturb/reference.py is the executable spec.
#include <torch/library.h>

#include "fastperturb/schemas.h"

TORCH_LIBRARY(fastperturb, m) {
  for (const char* schema : fastperturb::schemas::kAll) m.def(schema);
}
