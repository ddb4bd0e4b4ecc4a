"""The ``fastperturb`` command line: one subcommand per tool module.

Each tool lives in ``fastperturb/tools/<name>.py`` and exposes
``add_arguments(parser)`` and ``main(args) -> int``; it is imported only when
its subcommand runs, so a tool's optional dependencies never slow the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# name -> one-line help; the module is fastperturb.tools.<name> (with '-' as '_')
TOOLS = {
    "demo": (
        "train a small CNN on the bundled digits with SGD/SAM/LookSAM/AWP/APD and measure robustness to weight "
        "corruption"
    ),
    "demo-adversarial": "adversarial training (PGD, TRADES) with and without AWP on the digits: robustness, flatness",
    "robustness": "loss change indicators of a model under adversarial and random weight corruption",
    "bench": "time your model's training step with fastperturb's presets against the plain base optimizer step",
    "selftest": "run every available backend against the reference and print a verdict table",
}


def _tool(name: str):
    return importlib.import_module(f"fastperturb.tools.{name.replace('-', '_')}")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    from .tools._args import DefaultsHelpFormatter, OneLineParser

    parser = OneLineParser(
        prog="fastperturb", description=__doc__.splitlines()[0].replace("``", ""), formatter_class=DefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in TOOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        if name == wanted:  # import only the tool that runs
            _tool(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)  # a bad argument: one line, SystemExit(2)
    from .tools._args import UsageError

    try:
        return int(_tool(args.command).main(args) or 0)
    except UsageError as e:  # the user's mistake: one line, like argparse's own errors
        print(f"fastperturb {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
