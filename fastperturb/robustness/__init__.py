"""Loss change indicators: how much a trained model's loss and accuracy move when its weights are corrupted.

docs/design.md §2.4 and §8. For a corruption ``a`` of the weights ``w`` inside a ball
of radius ``eps`` the loss change is ``dL(a) = L(w + a) - L(w)``, where ``L`` is
the mean loss over the evaluation data. Three indicators:

* **adversarial**: the largest ``dL`` found by K-step projected ascent in
  parameter space. This is exactly the training engine
  (:class:`fastperturb.engine.Cycle`, the same fused ops): ``delta_k =
  Proj_B(delta_{k-1} + eta * D(g_{k-1}))`` with the gradient of the mean loss
  over *all* the evaluation data (accumulated over its mini-batches). Every
  point of the trajectory lies in the ball, so the indicator is the largest
  loss among ``w + delta_1 .. w + delta_K`` (with the default step sizes this
  is nearly always the last one). Default step: ``eta = eps`` for K = 1,
  ``eta = 1.5 eps / K`` otherwise (the APD paper's PGD step).
* **first_order**: the linearisation of the adversarial indicator,
  ``max_a <g, a> = eps * ||g||_q`` with ``q`` the dual norm (``eps ||g||_2``
  for L2, ``eps ||g||_1`` for L-infinity); with ``scope="layer"`` it is the sum
  over tensors ``sum_l r_l ||g_l||_q``.
* **random**: the mean ``dL`` over Gaussian corruptions ``a = r z / ||z||``
  scaled to the same norm and radius (per tensor or globally), over
  ``trials`` draws from a seeded generator. With ``antithetic=True`` (the
  default) the draws come in mirrored pairs ``a, -a``: the mean is the same
  expectation, but the first-order term ``<g, a>`` (zero on average, and large
  next to the second-order signal at small eps) cancels exactly within a pair
  instead of only on average. Applied by the same fused op
  (``ascent_step_`` with the Gaussian tensor in place of the gradient) and
  undone by the same exact restore.

Radius: ``relative=True`` (the default) makes ``eps`` a fraction of the
weights' norm, ``r_l = eps * ||w_l||`` per tensor (``scope="layer"``) or
``r = eps * ||w||`` over all corrupted tensors (``scope="global"``), in the
ball's norm; ``relative=False`` makes it absolute. Which tensors: ``params``
(all parameters that require grad by default; ``"weights"`` for tensors with
``dim > 1``, as AWP perturbs; a predicate ``(name, param) -> bool``; or a list).

Memory: besides the model's own ``.grad``, an evaluation keeps one
parameter-sized buffer per corrupted tensor for the backups (exact restore),
one for the clean gradient (reused by every ascent), one for the engine's
accumulator when K > 1 and one for the Gaussian draws.

Guarantees: the weights are bit-identical after any evaluation, also when it
is interrupted (exception, ``KeyboardInterrupt``); ``.grad``, the train/eval
flags and every buffer (BatchNorm running statistics) are put back as they
were. The model is evaluated in eval mode by default (BatchNorm uses its
running statistics, dropout is off); ``train_mode=True`` evaluates in train
mode, and the buffers it changes are restored afterwards.

Data: a pair of tensors ``(inputs, targets)`` (one batch), or an iterable of
such pairs (e.g. a ``DataLoader``) that can be iterated several times.
``loss_fn(output, target)`` must return the *mean* loss of the batch; the
loss over the data is ``sum_b n_b loss_b / N``. Accuracy is computed when the
output is ``[B, C]`` class scores with C >= 2 and the target ``[B]`` class indices
(a single ``[B, 1]`` logit has no argmax to take), or by an
``accuracy(output, target) -> number correct`` callable.

float16/bfloat16 weights round ``w + a``: where that makes a corruption's size
differ from eps by more than 2% on some tensor (a probe per eps), a
``RuntimeWarning`` says so; measure a float32 copy for points at the stated eps.
"""

from .indicators import KINDS, adversarial, clean, first_order, random_corruption, sweep
from .plot import plot_sweeps
from .results import ROW_FIELDS, Point, SweepResult, fit_slope

__all__ = [
    "KINDS",
    "Point",
    "SweepResult",
    "ROW_FIELDS",
    "adversarial",
    "random_corruption",
    "first_order",
    "clean",
    "sweep",
    "fit_slope",
    "plot_sweeps",
]
