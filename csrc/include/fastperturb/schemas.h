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
//   u     = l2: p * u | linf: u < -p ? -p : (u > p ? p : u)
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

// Restore folded into torch.optim.SGD's step (fastperturb/optim/fused_step.py):
// per element, from the backup b (the pre-perturbation weight) and g:
//   g = maximize ? -g : g;  if weight_decay: g += weight_decay * b
//   if momentum: buf = init_momentum ? g : momentum * buf + (1 - dampening) * g
//                g = nesterov ? g + momentum * buf : buf
//   params = b - lr * g
// momentum_buffers is empty iff momentum == 0. backups may be params themselves
// (a tensor that was not perturbed). Arithmetic: fastperturb/step_math.h.
inline constexpr const char* kSgdStep =
    "restore_sgd_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
    "float lr, float weight_decay=0.0, float momentum=0.0, float dampening=0.0, bool nesterov=False, "
    "bool maximize=False, bool init_momentum=False) -> ()";

// Restore folded into torch.optim.Adam's step (AdamW: decoupled_weight_decay),
// all tensors at the same step count `step` (after its increment):
//   g = maximize ? -g : g;  w = b, times (1 - lr * weight_decay) if decoupled, else g += weight_decay * w
//   m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
//   amsgrad (max_exp_avg_sqs non-empty): vmax = max(vmax, v) and v := vmax below
//   params = w - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
inline constexpr const char* kAdamStep =
    "restore_adam_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, *, float lr, float beta1, float beta2, float eps, "
    "float step, float weight_decay=0.0, bool decoupled_weight_decay=False, bool maximize=False) -> ()";

// Not a list op (not in kAll): the per-tensor coefficients of an l2 ascent step from grad_stats_'s rows
// [gg, dg, dd] (float32 [n, 3]) and the float64 [n] step sizes eta and radii r, computed in float64 and
// returned as float32 [n] (step_coef, proj) for ascent_step_ (fastperturb/engine.py, ascent_coefficients):
//   a = eta / sqrt(gg), with NaN and +inf (||g|| = 0) replaced by 0 and -inf by the lowest double
//   u = sqrt(max(dd + 2 a dg + a^2 gg, 0));  proj = u > r ? r / u : 1   (proj = 1 without project)
// global_scope: gg and the u^2 terms are summed over all tensors first, each u^2 weighed (R / r)^2 with R the
// largest radius (0 for r = 0), and proj = U > R ? R / U : 1 with U the root of that sum: the ellipsoid
// sum ||u_i||^2 / r_i^2 <= 1 of per-group radii, a plain ball for one radius; a tensor of radius 0 is projected
// on its own u. One eager CPU call in place of a
// dozen tiny torch ops; other devices and torch.compile run the reference's torch ops.
inline constexpr const char* kAscentCoefficients =
    "ascent_coefficients(Tensor stats, Tensor step_size, Tensor radius, *, bool global_scope, "
    "bool project) -> (Tensor, Tensor)";

// All of them, in the order above.
inline constexpr const char* kAll[] = {kNorms,    kGradStats, kAscentStep,  kRestore, kCombineGrads,
                                       kDotStats, kLincomb,   kEmaResidual, kSgdStep, kAdamStep};

}  // namespace schemas
}  // namespace fastperturb
