"""Developer entry point of the benchmarks: ``python -m benchmarks [options]``.

The implementation is the package's (:mod:`fastperturb.bench`), the same one
``fastperturb bench`` runs; this directory only makes it runnable from a
checkout without installing.
"""
