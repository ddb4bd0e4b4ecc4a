"""Entry point of the benchmarks: ``python -m benchmarks [options]`` from the repository root."""

import sys

from benchmarks.cli import entry

sys.exit(entry(prog="python -m benchmarks"))
