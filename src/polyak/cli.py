"""The ``polyak`` command. Each subcommand lives in its own module, imported only when it runs.

A subcommand module, ``polyak.commands.<name>``, provides ``configure(parser: argparse.ArgumentParser) -> None``
and ``run(args: argparse.Namespace) -> int``; register its name in ``COMMANDS`` with a one-line summary.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# name -> one-line summary; the command's code is the module (or package) polyak.commands.<name>
COMMANDS: dict[str, str] = {
    "demo": "show on real data (MNIST-1D, ~1 min of CPU) when averaged weights beat the last iterate",
    "average": "average checkpoint files (uniform, weighted or EMA), streaming",
    "export": "write the averaged weights of a checkpoint as a model-ready state dict",
    "bench": "time the averaging update against the memory-bandwidth floor and other libraries",
    "posthoc": "synthesise a power-function EMA of any length from PostHocEMA snapshots",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyak",
        description=(
            "polyak keeps averaged copies of a model's weights (EMA, SWA, post-hoc EMA). The command runs a demo "
            "and a benchmark, and works on checkpoint files (average, export, posthoc)."
        ),
        epilog="Run `polyak COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"polyak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        parser = _parser()
        parser.parse_args(args)  # prints help/version or an error and exits
        parser.print_help()
        return 2
    name, rest = args[0], args[1:]
    summary = COMMANDS[name]
    module = importlib.import_module(f"polyak.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"polyak {name}", description=summary)
    module.configure(parser)
    return int(module.run(parser.parse_args(rest)))


if __name__ == "__main__":
    raise SystemExit(main())
