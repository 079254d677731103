"""``entropy-collapse report RUN_DIR...``: figures and report.md from training runs."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from sigma_core.cli.argtypes import out_folder


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
    parser = subparsers.add_parser(
        "report", help="figures and report.md from one or more run folders",
        description="Read the metrics.jsonl, summary.json and samples/ of each run folder and write "
                    "report.md with a table of the final numbers, the bound check (every recorded "
                    "attention row against h_T) and figures (PNG, and SVG beside them): loss, entropy "
                    "per layer, every run's lowest head entropy in one panel, sigma_h of every head, "
                    "and every sampled row's entropy against the bound.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders written by `entropy-collapse train` (or `demo`)")
    parser.add_argument("--out", default=None, metavar="DIR", type=out_folder,
                        help="where report.md and the figures go (default: the run folder itself for one "
                             "RUN_DIR; for several, a folder named report beside them, in their common parent)")
    parser.set_defaults(func=_run, _parser=parser)
    return parser
