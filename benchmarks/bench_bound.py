"""Throughput and accuracy of ``theory.entropy_lower_bound`` against the textbook formula.

    .venv/bin/python benchmarks/bench_bound.py [--points 10000000] [--repeat 5]
    .venv/bin/python benchmarks/bench_bound.py --edges-only

``--edges-only`` skips the timing and prints the numbers quoted in
``docs/theory-verification.md``: the measured error of h against its documented bound
4 eps (log(T-1) + g + 4), the conservative inverse against 60-digit mpmath, the cost of the
outward rounding on extremal instances, and the relative accuracy of ``minimize_entropy``
where h is tiny.

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


def edges(seed=0):
    """The edge numbers of docs/theory-verification.md (a few seconds)."""
    import mpmath

    from theory import (extremal_instance, max_logit_norm, minimize_entropy, row_entropy_bounds,
                        softmax_entropy, theorem_bound)
    eps = np.finfo(float).eps
    data = json.loads(REFERENCE.read_text())
    rs = np.array([float(x) for x in data["logit_norm"]])
    rt = np.array(data["seq_len"], dtype=float)
    rh = np.array([float(x) for x in data["h"]])
    ok = (rh >= np.finfo(float).tiny) & (rt >= 2)
    g = rs[ok] * np.sqrt(rt[ok] / (rt[ok] - 1))
    err = np.abs(entropy_lower_bound(rs[ok], rt[ok]) - rh[ok]) / rh[ok]
    ratio = err / (4 * eps * (np.log(rt[ok] - 1) + g + 4))
    print(f"h vs 50-digit mpmath on {ok.sum()} reference points: max rel err {err.max():.2e}, "
          f"max (error / documented bound) {ratio.max():.2f}")

    rng = np.random.default_rng(seed)
    below, excess, n = 0, 0.0, 0
    for t in (2, 3, 10, 100, 10**4, 10**6, 10**12):
        fracs = np.r_[1 - 10.0 ** -rng.uniform(1, 15, 60), rng.uniform(0, 1, 30),
                      10.0 ** -rng.uniform(1, 300, 30)]
        for frac in fracs:
            target = frac * np.log(t)
            s = float(max_logit_norm(target, t))
            with mpmath.workdps(60):
                want = min(mpmath.mpf(float(target)), mpmath.log(t))
                h = entropy_lower_bound_mp(s, t, dps=60)
                below += bool(h < want)
                if s > 0:
                    excess = max(excess, float((h - want) / want))
            n += 1
    print(f"max_logit_norm on {n} (H, T) pairs (T = 2 .. 1e12, H near log T, mid, tiny): "
          f"{below} with h_T(s) < H in 60-digit mpmath; largest h_T(s) - H: {excess:.2e} H")

    worst, viol, m = 0.0, 0, 0
    for _ in range(400):
        t = int(rng.integers(1, 129))
        sigma, c = float(rng.uniform(0, 60)), float(rng.uniform(0.1, 3))
        row = int(rng.integers(0, t))
        X, W_Q, W_K = extremal_instance(sigma, t, t + int(rng.integers(0, 9)), row=row,
                                        token_norm=c)
        ent = softmax_entropy((X @ W_Q) @ (X @ W_K).T)[row]
        b = row_entropy_bounds(X, W_Q, W_K)
        gg = sigma * c * c * np.sqrt(t / max(t - 1, 1))
        for v in [theorem_bound(X, W_Q, W_K).value] + [b[k][row] for k in b]:
            viol += bool(v > ent)
            worst = max(worst, (ent - v) / ent / (1 + gg) if ent > 0 else 0.0)
            m += 1
    print(f"outward rounding on 400 extremal instances (T <= 128, sigma c^2 <= 540): {viol} of {m} "
          f"bounds above the measured entropy; largest loss {worst:.2e} x (1 + g) relative")

    from theory import extremal_logits
    above = {"nearest": 0, "down": 0}
    for _ in range(3000):
        s = float(rng.choice([rng.uniform(0, 60), rng.uniform(480, 760), rng.uniform(0, 1e-3)]))
        t = int(rng.integers(1, 300))
        ent = softmax_entropy(extremal_logits(s, t))
        for mode in above:
            above[mode] += bool(entropy_lower_bound(s, t, rounding=mode) > ent)
    print(f"entropy_lower_bound vs the measured entropy of the extremal row, 3000 (s, T) pairs "
          f"(s up to 760, T < 300): above it {above['nearest']} times with rounding='nearest', "
          f"{above['down']} with rounding='down'")

    short, n_mat = 0.0, 0
    for _ in range(150):
        r_, c_ = (int(x) for x in rng.integers(1, 13, 2))
        A = rng.standard_normal((r_, c_)) * 10.0 ** rng.uniform(-3, 3, (r_, c_))  # graded
        lapack = float(np.linalg.norm(A, 2))
        with mpmath.workdps(50):
            exact = max(mpmath.svd_r(mpmath.matrix(A.tolist()), compute_uv=False))
            short = max(short, float((exact - lapack) / exact) / eps)
        n_mat += 1
    print(f"LAPACK sigma_max vs 50-digit mpmath on {n_mat} graded random matrices (<= 12x12): "
          f"largest shortfall {short:.2f} eps (the instance bounds allow 4 max(m, n) eps)")

    for s, t in ((30.0, 5), (40.0, 16), (1.0, 5)):
        r = minimize_entropy(s, t, restarts=4, seed=0)
        ref = float(entropy_lower_bound_mp(s, t))
        print(f"minimize_entropy(s={s:g}, T={t}): value {r.value:.6e}, h (mpmath) {ref:.6e}, "
              f"rel diff {abs(r.value - ref) / ref:.1e}, informative={r.informative}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check", type=int, default=2000, help="mpmath-checked subsample")
    parser.add_argument("--edges-only", action="store_true",
                        help="skip the timing; print the edge numbers only")
    args = parser.parse_args(argv)
    if args.edges_only:
        edges()
        return

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
