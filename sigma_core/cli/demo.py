"""``entropy-collapse demo``: the bound in numbers, and the construction that attains it.

:func:`print_bound_demo` is the theory part (numpy only, through :mod:`theory`): a table of the
bound h_T(sigma * sigma_x) of Theorem 3.1 (``theory/README.md`` eq. (1)) for a few (sigma, T)
at sigma_x = 1, then the tightness construction of eq. (5) with its row entropy next to the
bound. Later commands may extend the demo (e.g. with training); they call this first.
"""
from __future__ import annotations

import argparse

import numpy as np

from sigma_core.cli.argtypes import positive_int
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
        run_demo(args.out, preset_name=args.preset, steps=args.steps)
    return 0


def register(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo", help="the entropy bound in numbers and its tight construction",
        description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo",
                        help="where the two training runs and the report go (default runs/demo)")
    parser.add_argument("--preset", choices=("cpu-smoke", "cpu-demo", "h200"), default=None,
                        help="training preset (default: h200 with CUDA, else cpu-demo)")
    parser.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="train baseline and sigmaReparam and write the report (default on)")
    parser.set_defaults(func=run)
