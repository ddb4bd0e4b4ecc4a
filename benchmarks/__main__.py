import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastperturb.bench.cli import entry  # noqa: E402

sys.exit(entry(prog="python -m benchmarks"))
