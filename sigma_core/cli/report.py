"""``entropy-collapse report RUN_DIR...``: figures and report.md from training runs."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_out(run_dirs: list[str]) -> Path:
    """One run: its own directory; several: ``report/`` beside them (in their common parent)."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0])
    return Path(os.path.commonpath([os.path.abspath(d) for d in run_dirs])) / "report"


def _run(args: argparse.Namespace) -> int:
    from sigma_core.experiments.report import write_report

    for d in args.run_dirs:
        if not Path(d).is_dir():
            args._parser.error(f"RUN_DIR {d} is not a directory")
    out = Path(args.out) if args.out else default_out(args.run_dirs)
    try:
        report = write_report(args.run_dirs, out)
    except ValueError as exc:
        args._parser.error(str(exc))
    print(f"report written to {report}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser("report", help="figures and report.md from run directories",
                                   description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by `train`")
    parser.add_argument("--out", default=None, help="output directory (default: see report --help)")
    parser.set_defaults(func=_run, _parser=parser)
    return parser
