"""fastperturb's benchmark runner: ``python -m benchmarks`` from a checkout.

Suites: ``ops`` (each fused op), ``cycle`` (SAM, AWP and APD-K perturb-restore
cycles on every backend, the reference and a ``torch._foreach_*`` version),
``step`` (full optimizer steps with synthetic gradients beside the peers),
``train`` (a real training step's perturbation overhead) and ``memory`` (peak
RSS of a separate process per implementation). The peers (:mod:`.peers`) are
reimplementations of other projects' optimizers; they live here, not in the
installed package.
"""

from .cli import add_arguments, entry, main, run

__all__ = ["add_arguments", "main", "run", "entry"]
