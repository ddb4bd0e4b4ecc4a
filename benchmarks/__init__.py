"""fastperturb's benchmark runner: ``python -m benchmarks`` from a checkout.

Suites: ``ops`` (each fused op), ``cycle`` (SAM, AWP and APD-K perturb-restore
cycles on every backend, the reference and a ``torch._foreach_*`` version),
``step`` (full optimizer steps with synthetic gradients beside the peers),
``train`` (a real training step's perturbation overhead) and ``memory`` (peak
RSS of a separate process per implementation). The peers (:mod:`.peers`) are
reimplementations of other projects' optimizers; they live here, not in the
installed package.
"""

__all__ = ["add_arguments", "main", "run", "entry"]


def __getattr__(name: str):
    # The runner's functions are loaded on first use: importing them here made ``python -m benchmarks.<module>``
    # load torch, triton and every suite module (that module among them) before running it as __main__.
    if name in __all__:
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
