"""``entropy-collapse compare``: sigmaReparam vs QK-LayerNorm, soft-capping and spectral norm.

A learning-rate sweep of every method of :data:`sigma_core.experiments.compare.METHODS` on one preset
(``cpu-compare`` by default, ``h200`` when CUDA is available), written as ``compare.md``,
``compare.csv``, ``runs.csv``, ``loss_vs_lr.png`` and ``entropy_vs_lr.png`` with the largest
stable learning rate per method (definitions in :mod:`sigma_core.experiments.compare`).
"""
from __future__ import annotations

import argparse

from sigma_core.cli.argtypes import nonnegative_int, positive_float, positive_int
from sigma_core.experiments.compare import DEFAULT_LRS, DEFAULT_SOFTCAP, METHODS


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from sigma_core.experiments.compare import run_compare  # noqa: PLC0415

    name = args.preset or ("h200" if torch.cuda.is_available() else "cpu-compare")
    paths = run_compare(args.out, preset_name=name, methods=tuple(args.methods), lrs=tuple(args.lrs),
                        seeds=tuple(args.seeds), jobs=args.jobs, threads=args.threads, steps=args.steps,
                        softcap=args.softcap, keep_checkpoints=args.keep_checkpoints)
    print(paths["md"].read_text())
    return 0


def register(subparsers) -> None:
    """Add the ``compare`` sub-command."""
    from sigma_core.experiments.config import PRESETS  # noqa: PLC0415

    parser = subparsers.add_parser(
        "compare", help="learning-rate sweep: sigmaReparam vs QK-LayerNorm, soft-capping, spectral norm",
        description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="training preset (default: h200 with CUDA, else cpu-compare)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to compare (default all)")
    parser.add_argument("--lrs", nargs="+", type=positive_float, default=list(DEFAULT_LRS),
                        help=f"learning rates (default {' '.join(f'{x:g}' for x in DEFAULT_LRS)})")
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0], help="seeds (default 0)")
    parser.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps")
    parser.add_argument("--jobs", type=positive_int, default=1, help="parallel training processes (default 1)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads per process (default 1)")
    parser.add_argument("--softcap", type=positive_float, default=DEFAULT_SOFTCAP,
                        help=f"the softcap method's logit cap c (default {DEFAULT_SOFTCAP:g}, Gemma 2)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint.pt")
    parser.set_defaults(func=run)
