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

// The SAM-family ops (GSAM, WSAM, LookSAM, FriendlySAM).
//
// Per tensor [sum x*x, sum x*y, sum y*y] as float32 [n, 3]; x[i] and y[i] are
// parallel. Read-only. GSAM's and LookSAM's inner products of the clean and the
// perturbed gradients.
inline constexpr const char* kDotStats = "dot_stats(Tensor[] x, Tensor[] y) -> Tensor";

// Per element of tensor i, with (c0, c1, c2) = coef[i] (float32 [n, 3]):
//   out = c0*out + c1*x + c2*y      (no c2 term when y is empty)
// When c0 == 0 exactly, out is not read (write-only: NaN in it does not leak).
// Returns float32 [n]: per tensor sum out^2 of the stored (rounded) values.
inline constexpr const char* kLincomb = "lincomb_(Tensor(a!)[] out, Tensor[] x, Tensor[] y, Tensor coef) -> Tensor";

// FriendlySAM's sweep, per element with g = grad_scale * grads, m = ema:
//   init: m = g, d = g;   else: d = g - sigma*m, m = lmbda*m + (1 - lmbda)*g
//   (m is left unchanged where g is not finite);   grads = d.
// Returns float32 [n]: per tensor sum (t*d)^2, t = |params| + adaptive_eta when
// adaptive_eta >= 0 (else 1; params may then be empty). init never reads ema.
inline constexpr const char* kEmaResidual =
    "ema_residual_(Tensor(a!)[] grads, Tensor(b!)[] ema, Tensor[] params, *, float sigma, float lmbda, "
    "bool init, float grad_scale=1.0, float adaptive_eta=-1.0) -> Tensor";

// All of them, in the order above.
inline constexpr const char* kAll[] = {kNorms,        kGradStats, kAscentStep, kRestore,
                                       kCombineGrads, kDotStats,  kLincomb,    kEmaResidual};

}  // namespace schemas
}  // namespace fastperturb
