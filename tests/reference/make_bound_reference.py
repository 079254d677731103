"""Generate ``bound_reference.json``: h_T(s) of eq. (2) at 50 digits, for ``tests/test_bound.py``.

Run from the repository root (takes a few seconds; the output is committed):

    .venv/bin/python tests/reference/make_bound_reference.py

The grid covers s in [0, 1e4] (zero, log-spaced from 1e-8, and values near the underflow
edge of float64) and T in [1, 1e12] (small, powers of ten, and random integers), plus random
log-uniform pairs. Inputs are float64 values written with ``repr`` (exact round trip) and
evaluated exactly as binary floats by :func:`theory.certify.entropy_lower_bound_mp`; outputs
are decimal strings with 30 significant digits.
"""
from __future__ import annotations

import json
from pathlib import Path

import mpmath
import numpy as np

from theory.certify import entropy_lower_bound_mp

DPS = 50
OUT = Path(__file__).with_name("bound_reference.json")


def grid():
    rng = np.random.default_rng(20230314)
    s_grid = np.concatenate([[0.0], np.logspace(-8, 4, 37), [0.1, 0.5, 1.5, 2.0, 3.0, 700.0, 745.0,
                                                             760.0, 9999.0, 1e4]])
    t_grid = np.concatenate([[1, 2, 3, 4, 5, 8, 10, 16, 64, 100, 512, 1000, 4096],
                             10.0 ** np.arange(4, 13),
                             np.floor(10 ** rng.uniform(0.3, 12, 8))]).astype(np.float64)
    s_pairs, t_pairs = np.meshgrid(s_grid, t_grid, indexing="ij")
    s_rand = 10 ** rng.uniform(-6, 4, 600)
    t_rand = np.floor(10 ** rng.uniform(np.log10(2), 12, 600))
    # points just where the value crosses the smallest normal float64 (g ~ 708 + log(T-1))
    t_edge = np.floor(10 ** rng.uniform(np.log10(2), 12, 100))
    g_edge = 700.0 + np.log(t_edge - 1) + rng.uniform(0, 20, 100)
    s_edge = g_edge / np.sqrt(t_edge / (t_edge - 1))
    s = np.concatenate([s_pairs.ravel(), s_rand, s_edge])
    t = np.concatenate([t_pairs.ravel(), t_rand, t_edge])
    return s, t


def main():
    s, t = grid()
    h = entropy_lower_bound_mp(s, t.astype(np.int64), dps=DPS)
    with mpmath.workdps(DPS):
        values = [mpmath.nstr(v, 30, min_fixed=1, max_fixed=0) for v in h]
    data = {
        "description": "h_T(s) of theory/README.md eq. (2); inputs are exact float64 values",
        "generator": "tests/reference/make_bound_reference.py",
        "dps": DPS,
        "logit_norm": [repr(float(x)) for x in s],
        "seq_len": [int(x) for x in t],
        "h": values,
    }
    OUT.write_text(json.dumps(data, indent=0) + "\n")
    print(f"wrote {len(values)} reference values to {OUT}")


if __name__ == "__main__":
    main()
