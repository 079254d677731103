"""``entropy-collapse compare``: sigmaReparam vs QK-LayerNorm, soft-capping and spectral norm.

A learning-rate sweep of every method of :data:`sigma_core.experiments.compare.METHODS` on one preset
(``cpu-compare`` by default, ``h200`` when CUDA is available), written as ``compare.md``,
``compare.csv``, ``runs.csv``, ``loss_vs_lr.png`` and ``entropy_vs_lr.png`` with the largest
stable learning rate per method (definitions in :mod:`sigma_core.experiments.compare`).
"""
from __future__ import annotations

import argparse
import sys

from sigma_core.cli.argtypes import nonnegative_int, out_folder, positive_float, positive_int
from sigma_core.experiments.compare import DEFAULT_LRS, DEFAULT_SOFTCAP, METHODS


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from sigma_core.experiments.compare import run_compare  # noqa: PLC0415

    name = args.preset or ("h200" if torch.cuda.is_available() else "cpu-compare")
    try:
        paths = run_compare(args.out, preset_name=name, methods=tuple(args.methods), lrs=tuple(args.lrs),
                            seeds=tuple(args.seeds), jobs=args.jobs, threads=args.threads, steps=args.steps,
                            softcap=args.softcap, keep_checkpoints=args.keep_checkpoints)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: no result, no traceback
        print(f"entropy-collapse compare: cannot write {args.out}: {exc.strerror or exc}"
              f"{f' ({exc.filename})' if exc.filename else ''}; no table was written", file=sys.stderr)
        return 1
    print(paths["md"].read_text())
    return 0


DESCRIPTION = """\
Train the GPT with each method at each learning rate and seed, then write compare.md and
compare.csv (final validation loss, entropy, sigma_h, collapse and divergence per method and
rate), runs.csv (one row per run, pointing at its folder under OUT/runs/), loss_vs_lr.png,
entropy_vs_lr.png and meta.json (settings, commit, wall time, largest stable rate per method).
Each run's config.json, metrics.jsonl, summary.json and samples/ stay in OUT/runs/METHOD/lr_LR/seed_S/
(checkpoints are deleted unless --keep-checkpoints); a rerun reuses finished runs.

Methods: baseline; sigma-reparam (sigmaReparam on every linear layer); sigma-reparam-no-ln
(the same without LayerNorm); qk-layernorm (LayerNorm on each head's q and k); softcap
(logits c*tanh(a/c)); spectral-norm (torch's spectral_norm, gamma fixed at 1).
Definitions (sigma_core/experiments/definitions.py, as in the report and the claims ledger):
collapsed: some head's entropy below 0.1 nats at a logged step.  Diverged: a non-finite loss
or gradient, a crash, or no finite final validation loss.  Learned: a final validation loss
0.05 nats below log 256.  Stable: every seed learned and none collapsed or diverged.

How long: the default (6 methods x 6 rates, seed 0, cpu-compare preset, 200 steps) is 36
runs of a few seconds each on one CPU core; 3 seeds (108 runs) need about 13 minutes of
training time, about half of that in wall-clock time with --jobs 2 on 2 cores.
With CUDA the default preset is h200 (1000 steps of a larger model per run)."""


def register(subparsers) -> None:
    """Add the ``compare`` sub-command."""
    from sigma_core.cli import HelpFormatter  # noqa: PLC0415
    from sigma_core.experiments.config import PRESETS  # noqa: PLC0415

    parser = subparsers.add_parser(
        "compare", help="learning-rate sweep: sigmaReparam against QK-LayerNorm, soft-capping, spectral_norm",
        description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="runs/compare", metavar="OUT", type=out_folder, help="output folder (default runs/compare)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, metavar="NAME",
                        help="training preset (default: h200 with CUDA, else cpu-compare)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                        help="methods to compare (default all: " + " ".join(METHODS) + ")")
    parser.add_argument("--lrs", nargs="+", type=positive_float, default=list(DEFAULT_LRS), metavar="LR",
                        help=f"learning rates (default {' '.join(f'{x:g}' for x in DEFAULT_LRS)})")
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0], metavar="SEED",
                        help="seeds (default 0)")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="train N steps instead of the preset's (cpu-compare: 200)")
    parser.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                        help="parallel training processes (default 1)")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="torch threads per process (default 1)")
    parser.add_argument("--softcap", type=positive_float, default=DEFAULT_SOFTCAP, metavar="C",
                        help=f"the softcap method's logit cap c (default {DEFAULT_SOFTCAP:g}, Gemma 2)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint.pt")
    parser.set_defaults(func=run)
