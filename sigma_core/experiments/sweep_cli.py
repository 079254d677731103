"""The command line shared by the claims' own sweeps (:mod:`lm_claim`, :mod:`ssl_claim`):
``run --out DIR --jobs N`` trains the sweep, ``summary --results DIR`` prints its verdict as JSON."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def sweep_main(argv, *, prog: str, doc: str | None, default_results: str, run_all: Callable[..., None],
               summary: Callable[[str], dict]) -> int:
    """Parse ``argv`` and run ``run_all(out, jobs=N)`` or print ``summary(results)`` as JSON."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the sweep")
    run.add_argument("--out", default=default_results)
    run.add_argument("--jobs", type=int, default=1)
    show = sub.add_parser("summary", help="print the verdict of a finished sweep")
    show.add_argument("--results", default=default_results)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        run_all(args.out, jobs=args.jobs)
        return 0
    print(json.dumps(summary(args.results), indent=2, default=str))
    return 0
