"""``fastperturb bench``: microbenchmarks (see :mod:`fastperturb.bench`)."""

from fastperturb.bench.cli import add_arguments, main

__all__ = ["add_arguments", "main"]
