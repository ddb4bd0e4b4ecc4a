// The op set: the one place where the schemas of fastperturb's fused ops are
// written down. Every backend (C++ CPU, CUDA, the Triton custom ops in Python,
// the fake impls) takes its signature from here; fastperturb/reference.py is
// the executable spec of what each op computes.
#include <torch/library.h>

TORCH_LIBRARY(fastperturb, m) {
  // Per-tensor norms (float32 [n]) and the norm over the whole list (float32
  // 0-dim). ord is 2 or inf. An empty tensor has norm 0; NaN propagates.
  m.def("norms(Tensor[] tensors, float ord) -> (Tensor, Tensor)");

  // One pass over the gradients gathering what the next ascent step needs:
  // returns float32 [n, 3] = [sum (t*g)^2, sum d*g, sum d^2] per tensor with
  // d = params - backups (columns 1-2 are 0 when params/backups are empty)
  // and t = |params| + adaptive_eta when adaptive_eta >= 0 (else t = 1).
  // If accum is non-empty: accum = w*g (accum_init) or accum += w*g.
  m.def(
      "grad_stats_(Tensor[] grads, Tensor(a!)[] accum, Tensor[] params, "
      "Tensor[] backups, *, float accum_weight=1.0, bool accum_init=False, "
      "float adaptive_eta=-1.0) -> Tensor");

  // One projected ascent step applied in place. Per element, with a = step_coef[i]
  // and p = proj[i] of the tensor's index i:
  //   base  = first ? w : backup        delta = first ? 0 : w - backup
  //   dir   = l2: g | linf: sign(g);    adaptive: dir = (|base| + eta)^2 * g
  //   u     = delta + a * dir
  //   u     = l2: p * u | linf: clamp(u, -p, p)
  //   w     = base + u;  if first: backup = old w;  if zero_grads: g = 0
  m.def(
      "ascent_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] backups, "
      "Tensor step_coef, Tensor proj, *, str norm=\"l2\", bool first=False, "
      "float adaptive_eta=-1.0, bool zero_grads=False) -> ()");

  // params = backups, bit for bit.
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");

  // grads = accum + weight * grads (the last term of the descent gradient).
  m.def("combine_grads_(Tensor(a!)[] grads, Tensor[] accum, float weight) -> ()");
}
