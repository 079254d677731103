"""``entropy-collapse compare``: sigmaReparam vs QK-LayerNorm, soft-capping and spectral norm.

A learning-rate sweep of every method of :data:`sigma_core.compare.METHODS` on one preset
(``cpu-compare`` by default, ``h200`` when CUDA is available), written as ``compare.md``,
``compare.csv``, ``runs.csv``, ``loss_vs_lr.png`` and ``entropy_vs_lr.png`` with the largest
stable learning rate per method (definitions in :mod:`sigma_core.compare`).
"""
from __future__ import annotations

import argparse

from sigma_core.compare import DEFAULT_LRS, DEFAULT_SOFTCAP, METHODS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from sigma_core.compare import run_compare  # noqa: PLC0415

    name = args.preset or ("h200" if torch.cuda.is_available() else "cpu-compare")
    paths = run_compare(args.out, preset_name=name, methods=tuple(args.methods), lrs=tuple(args.lrs),
                        seeds=tuple(args.seeds), jobs=args.jobs, threads=args.threads, steps=args.steps,
                        softcap=args.softcap, keep_checkpoints=args.keep_checkpoints)
    print(paths["md"].read_text())
    return 0


def register(subparsers) -> None:
    """Add the ``compare`` sub-command."""
    from sigma_core.config import PRESETS  # noqa: PLC0415

    parser = subparsers.add_parser(
        "compare", help="learning-rate sweep: sigmaReparam vs QK-LayerNorm, soft-capping, spectral norm",
        description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="training preset (default: h200 with CUDA, else cpu-compare)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to compare (default all)")
    parser.add_argument("--lrs", nargs="+", type=_positive_float, default=list(DEFAULT_LRS),
                        help=f"learning rates (default {' '.join(f'{x:g}' for x in DEFAULT_LRS)})")
    parser.add_argument("--seeds", nargs="+", type=_seed, default=[0], help="seeds (default 0)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="override the preset's steps")
    parser.add_argument("--jobs", type=_positive_int, default=1, help="parallel training processes (default 1)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch threads per process (default 1)")
    parser.add_argument("--softcap", type=_positive_float, default=DEFAULT_SOFTCAP,
                        help=f"the softcap method's logit cap c (default {DEFAULT_SOFTCAP:g}, Gemma 2)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint.pt")
    parser.set_defaults(func=run)
