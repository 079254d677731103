"""Throughput and accuracy of ``theory.entropy_lower_bound`` against the textbook formula.

    .venv/bin/python benchmarks/bench_bound.py [--points 10000000] [--repeat 5]

Both are timed side by side on the same arrays in the same run, on one core (numpy's
elementwise ufuncs are single-threaded): 10^7 points with s ~ U[0, 60] and integer
T ~ log-uniform [2, 10^4], once with an array T and once with a scalar T = 512. The textbook
("naive") formula is eq. (1) written literally with full-size numpy temporaries:

    beta = exp(-s sqrt(T/(T-1)));  log(1 + (T-1) beta) + s sqrt(T(T-1)) beta / (1 + (T-1) beta)

Accuracy: the maximum relative error of each against 50-digit mpmath
(``theory.certify.entropy_lower_bound_mp``) on a random subsample of the benchmark points, and
on the committed reference grid ``tests/reference/bound_reference.json`` (s up to 1e4,
T up to 1e12), counting only values that are normal float64.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from theory.bound import entropy_lower_bound
from theory.certify import entropy_lower_bound_mp

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "bound_reference.json"


def naive(s, t):
    """The textbook form of eq. (1), as one would first type it."""
    beta = np.exp(-s * np.sqrt(t / (t - 1)))
    return np.log(1 + (t - 1) * beta) + s * np.sqrt(t * (t - 1)) * beta / (1 + (t - 1) * beta)


def best_times(fns, repeat):
    """Best wall time of each function, run interleaved so load changes hit both alike."""
    best = [np.inf] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def max_rel_err(values, ref):
    normal = ref >= np.finfo(float).tiny
    with np.errstate(all="ignore"):
        err = np.abs(values[normal] - ref[normal]) / ref[normal]
    return float(np.nanmax(np.where(np.isfinite(err), err, np.inf)))


def count_warnings(fn):
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="warn"):
        warnings.simplefilter("always")
        out = fn()
    return out, len(caught)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check", type=int, default=2000, help="mpmath-checked subsample")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    s = rng.uniform(0, 60, args.points)
    t = np.floor(10 ** rng.uniform(np.log10(2), 4, args.points))
    idx = rng.choice(args.points, size=min(args.check, args.points), replace=False)
    print(f"entropy_lower_bound vs the naive formula: {args.points:.0e} points, best of "
          f"{args.repeat}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'case':<22}{'ours /s':>12}{'naive /s':>12}{'ratio':>8}"
          f"{'ours max rel err':>18}{'naive max rel err':>19}{'naive warnings':>16}")
    for case, t_arg in (("array s, array T", t), ("array s, scalar T=512", 512)):
        t_full = np.broadcast_to(np.asarray(t_arg, dtype=float), s.shape)
        with np.errstate(all="ignore"):
            ours_t, naive_t = best_times([lambda: entropy_lower_bound(s, t_arg),
                                          lambda: naive(s, t_arg)], args.repeat)
        ref = entropy_lower_bound_mp(s[idx], t_full[idx].astype(np.int64), dps=50).astype(float)
        ours_err = max_rel_err(entropy_lower_bound(s[idx], t_full[idx]), ref)
        naive_vals, n_warn = count_warnings(lambda: naive(s[idx], t_full[idx]))
        naive_err = max_rel_err(naive_vals, ref)
        print(f"{case:<22}{args.points / ours_t:12.3g}{args.points / naive_t:12.3g}"
              f"{naive_t / ours_t:7.2f}x{ours_err:18.2e}{naive_err:19.2e}{n_warn:16d}")

    data = json.loads(REFERENCE.read_text())
    rs = np.array([float(x) for x in data["logit_norm"]])
    rt = np.array(data["seq_len"], dtype=float)
    rh = np.array([float(x) for x in data["h"]])
    ours_vals, ours_warn = count_warnings(lambda: entropy_lower_bound(rs, rt))
    ours_err = max_rel_err(ours_vals, rh)
    naive_vals, n_warn = count_warnings(lambda: naive(rs, rt))
    naive_err = max_rel_err(naive_vals, rh)
    print(f"reference grid ({len(rs)} points, s <= 1e4, T <= 1e12, incl. T = 1): max rel err "
          f"ours {ours_err:.2e} ({ours_warn} warnings), naive {naive_err:.2e} "
          f"({n_warn} warnings)")


if __name__ == "__main__":
    main()
