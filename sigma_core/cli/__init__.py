"""The ``entropy-collapse`` command line.

Each sub-command lives in its own module, which exposes ``register(subparsers)``: it adds
its parser and sets ``func`` (called with the parsed namespace; its return value is the
exit status).  A bad argument prints one line (``entropy-collapse train: error: --lr must be a
positive finite number, got -1``) and a pointer to the sub-command's ``--help``, and exits
with status 2; no usage block is printed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: modules that register a sub-command, in the order ``--help`` lists them
COMMAND_MODULES = (
    "sigma_core.cli.demo",
    "sigma_core.cli.train",
    "sigma_core.cli.report",
    "sigma_core.cli.compare",
)

DESCRIPTION = """\
Attention entropy collapse and sigmaReparam (Zhai et al., ICML 2023, arXiv 2303.06296):
train Transformers, watch each attention head's entropy against the paper's lower bound,
compare sigmaReparam with other stabilisers.  `entropy-collapse COMMAND --help` describes
a command and its options."""


class CLIParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line plus where to look.

    argparse prints the whole usage block before an error; for a command with forty options
    that hides the one line that matters.  Sub-parsers inherit the class.
    """

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Plain descriptions kept as written, more room for option names, no line break inside
    a hyphenated word (``cpu-demo``, ``--d-model``)."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _split_lines(self, text, width):  # noqa: D102 - argparse API
        import textwrap  # noqa: PLC0415

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog="entropy-collapse", description=DESCRIPTION, formatter_class=HelpFormatter,
                       usage="entropy-collapse {demo,train,report,compare} [options]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="entropy-collapse",
                                title="commands")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # no command: say what there is
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except Exception as exc:  # only the errors a user can fix; anything else keeps its traceback
        from sigma_core.experiments import train  # noqa: PLC0415
        from sigma_core.experiments.data import CorpusError  # noqa: PLC0415

        fixable = (CorpusError, *((train.DirtyTreeError,) if hasattr(train, "DirtyTreeError") else ()))
        if not isinstance(exc, fixable):
            raise
        print(f"entropy-collapse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
