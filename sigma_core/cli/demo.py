"""``entropy-collapse demo``: the bound in numbers, then collapse and its cure in one training pair.

:func:`print_bound_demo` is the theory part (numpy only, through :mod:`theory`): a table of the
bound h_T(sigma * sigma_x) of Theorem 3.1 (``theory/README.md`` eq. (1)) for a few (sigma, T)
at sigma_x = 1, then the tightness construction of eq. (5) with its row entropy next to the
bound.  Unless ``--no-train`` is given, :func:`sigma_core.experiments.train.run_demo` then trains
the baseline GPT and its sigmaReparam twin and writes their report.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from sigma_core.cli.argtypes import out_folder, positive_int
from theory import entropy_lower_bound, extremal_instance, softmax_entropy, theorem_bound

#: the grid of the demo table
DEMO_SIGMAS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
DEMO_SEQ_LENS = (2, 16, 128, 1024)


def print_bound_demo(sigmas=DEMO_SIGMAS, seq_lens=DEMO_SEQ_LENS, *, file=None):
    """Print the bound table and check the tightness construction; return the largest gap.

    Parameters
    ----------
    sigmas : sequence of float
        sigma = ``||W_K W_Q^T||_2`` values (rows of the table), with sigma_x = 1.
    seq_lens : sequence of int
        T values (columns).
    file : file-like, optional
        Where to print (default stdout).

    Returns
    -------
    float
        max over the grid of |Ent(row) / bound - 1| for the extremal instances: a few
        1e-16, i.e. the bound is attained (eq. (5)).

    Examples
    --------
    >>> import io
    >>> gap = print_bound_demo((0.0, 3.0), (4,), file=io.StringIO())
    >>> gap < 1e-12
    True
    """
    def out(*a):
        print(*a, file=file)

    out("Theorem 3.1 (Zhai et al., ICML 2023): every attention row has entropy >= h_T(sigma*sigma_x)")
    out("  h_T(s) = log(1 + a) + g a/(1 + a),  g = s sqrt(T/(T-1)),  a = (T-1) e^{-g}")
    out("  sigma = ||W_K W_Q^T||_2,  sigma_x = ||X X^T||_2  (here sigma_x = 1)\n")
    head = "sigma \\ T".ljust(10) + "".join(f"{t:>12d}" for t in seq_lens)
    out("Entropy lower bound in nats (log T is the uniform row's entropy)")
    out(head)
    out("-" * len(head))
    for sigma in sigmas:
        row = entropy_lower_bound(sigma, np.asarray(seq_lens))
        out(f"{sigma:<10g}" + "".join(f"{v:12.4g}" for v in row))
    out("\nThe bound falls like (T-1)(1+g)e^{-g} once sigma*sigma_x exceeds log T: a large")
    out("sigma permits a collapsed (nearly one-hot) row; small sigma forbids it.\n")

    out("Tightness: X = orthonormal tokens, W_Q = sqrt(sigma) e_0, W_K = sqrt(sigma) u,")
    out("u = centred unit vector e_0 - 1/T; row 0's entropy equals the bound.")
    out(f"{'sigma':>8}{'T':>8}{'bound':>14}{'Ent(row 0)':>14}{'rel. diff.':>15}")
    worst = 0.0
    for sigma in sigmas:
        for t in seq_lens:
            X, W_Q, W_K = extremal_instance(sigma, t)
            bound = theorem_bound(X, W_Q, W_K).value
            logits = (X[:1] @ W_Q) @ (X @ W_K).T      # (1, T): query 0 over the keys
            ent = float(softmax_entropy(logits)[0])
            gap = abs(ent / bound - 1.0)
            worst = max(worst, gap)
            if t == seq_lens[-1] or sigma in (sigmas[0], sigmas[-1]):
                out(f"{sigma:8g}{t:8d}{bound:14.6g}{ent:14.6g}{gap:15.2e}")
    out(f"Largest |Ent / bound - 1| over the grid: {worst:.2e}: the bound is attained.")
    return worst


def run(args: argparse.Namespace) -> int:
    print_bound_demo()
    if args.train:
        from sigma_core.experiments.train import run_demo

        print()
        try:
            run_demo(args.out, preset_name=args.preset, steps=args.steps)
        except OSError as exc:  # a full disk, a folder made read-only meanwhile: say so, no traceback
            print(f"entropy-collapse demo: cannot write {args.out}: {exc.strerror or exc}"
                  f"{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
            return 1
    return 0


DESCRIPTION = """\
What it does, in order:
  1. prints Theorem 3.1's entropy lower bound h_T for a few sigma and T, and checks that the
     construction attaining it has exactly that entropy (about a second);
  2. trains the byte-level GPT twice at a learning rate where plain attention collapses:
     the baseline, then the same model with sigmaReparam on every linear layer;
  3. writes both run folders and a report (report.md and its figures) under --out.

How long: step 2 dominates.  With the default cpu-demo preset (400 steps each) the pair
takes about 5 minutes on a 2-core CPU (torch 2.13.0, CPU build); --preset classroom takes
well under a minute, --no-train only prints step 1.  With CUDA the default is the h200 preset
(1000 steps of a larger model each).

Afterwards: open DIR/report/report.md (DIR is --out)."""


def register(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    from sigma_core.cli import HelpFormatter  # noqa: PLC0415

    parser = subparsers.add_parser(
        "demo", help="the bound in numbers, then a baseline and a sigmaReparam GPT trained side by "
                     "side, with a report (about 5 min on a CPU; --no-train: a second)",
        description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="runs/demo", metavar="DIR", type=out_folder,
                        help="where the two run folders and the report go (default runs/demo)")
    parser.add_argument("--preset", choices=("cpu-smoke", "classroom", "cpu-demo", "h200"), default=None,
                        metavar="NAME",
                        help="training preset: cpu-smoke (seconds), classroom (under a minute), cpu-demo "
                             "(the default without CUDA), h200 (the default with CUDA)")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="train N steps instead of the preset's (cpu-demo: 400, h200: 1000)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-train prints the bound and stops (default: train)")
    parser.set_defaults(func=run)
