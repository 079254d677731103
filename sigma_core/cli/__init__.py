"""The ``entropy-collapse`` command line.

Each sub-command lives in its own module, which exposes ``register(subparsers)``: it adds
its parser and sets ``func`` (called with the parsed namespace; its return value is the
exit status).  Argument errors go through argparse, so they print usage and exit with 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: modules that register a sub-command, in the order ``--help`` lists them
COMMAND_MODULES = (
    "sigma_core.cli.train",
    "sigma_core.cli.report",
    "sigma_core.cli.demo",
    "sigma_core.cli.compare",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropy-collapse",
        description="Attention entropy collapse and sigmaReparam: bound, training, reports.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
