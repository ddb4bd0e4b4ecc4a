// The schema strings of fastperturb's fused ops: the one place they are written
// down. csrc/schemas.cpp defines the ops with them (TORCH_LIBRARY(fastperturb));
// the test build's work-list executor (csrc/testing/worklist_executor.cpp)
// defines the same ops in its own namespace from these same strings, and the
// Triton backend reads them back from the registration. Every backend takes its
// signature from here; fastperturb/ops/reference.py is the executable spec of
// each op, docs/design.md §3 the contract. The Python list of the op names,
// fastperturb/ops/names.py, must follow kAll (a test checks it).
#pragma once

namespace fastperturb {
namespace schemas {

// Per-tensor norms (float32 [n]) and the norm over the whole list (float32
// 0-dim). ord is 2 or inf. An empty tensor has norm 0; NaN propagates.
inline constexpr const char* kNorms = "norms(Tensor[] tensors, float ord) -> (Tensor, Tensor)";

// One pass over the gradients gathering what the next ascent step needs:
// returns float32 [n, 3] = [sum (t*g)^2, sum d*g, sum d^2] per tensor with
// d = params - backups (columns 1-2 are 0 when params/backups are empty)
// and t = |params| + adaptive_eta when adaptive_eta >= 0 (else t = 1).
// If accum is non-empty: accum = w*g (accum_init) or accum += w*g.
inline constexpr const char* kGradStats =
    "grad_stats_(Tensor[] grads, Tensor(a!)[] accum, Tensor[] params, "
    "Tensor[] backups, *, float accum_weight=1.0, bool accum_init=False, "
    "float adaptive_eta=-1.0) -> Tensor";

// One projected ascent step applied in place. Per element, with a = step_coef[i]
// and p = proj[i] of the tensor's index i:
//   base  = first ? w : backup        delta = first ? 0 : w - backup
//   dir   = l2: g | linf: sign(g);    adaptive: dir = (|base| + eta)^2 * g
//   u     = delta + a * dir
//   u     = l2: p * u | linf: clamp(u, -p, p)
//   w     = base + u;  if first: backup = old w;  if zero_grads: g = 0
inline constexpr const char* kAscentStep =
    "ascent_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] backups, "
    "Tensor step_coef, Tensor proj, *, str norm=\"l2\", bool first=False, "
    "float adaptive_eta=-1.0, bool zero_grads=False) -> ()";

// params = backups, bit for bit.
inline constexpr const char* kRestore = "restore_(Tensor(a!)[] params, Tensor[] backups) -> ()";

// grads = accum + weight * grads (the last term of the descent gradient).
inline constexpr const char* kCombineGrads = "combine_grads_(Tensor(a!)[] grads, Tensor[] accum, float weight) -> ()";

// All five, in the order above.
inline constexpr const char* kAll[] = {kNorms, kGradStats, kAscentStep, kRestore, kCombineGrads};

}  // namespace schemas
}  // namespace fastperturb
