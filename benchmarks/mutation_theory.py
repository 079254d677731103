"""Mutation pass over ``theory/``: a fixed list of deliberate bugs, each run against its fast tests.

    .venv/bin/python benchmarks/mutation_theory.py [--only ID ...] [--timeout 240] [--out FILE]

Each mutant replaces one exact snippet of one module (the snippet must occur exactly once, or
the script stops: a stale mutant is a bug of the script, not a survivor). The whole package
and the theory tests are copied to a temporary directory, the copy is mutated (the working
tree is never touched, so other work can go on), and the tests relevant to that module run
there with ``pytest -x`` under the derandomized Hypothesis profile ``ci``, including the
module's doctests. A mutant is *killed* when a test fails or errors (or the run times out),
and *survives* when every test passes. An unmutated baseline run must pass first, and a
check confirms that the copy, not the working tree, is what the tests import.

Tests that need torch or ``sigma_core`` (``tests/test_inputs.py``, ``tests/test_soak.py``)
and the slow grid are not part of the pass (``-m "not slow"``); the kill rate is for the
fast theory tests alone. The list and the explanation of every survivor are in
``docs/theory-verification.md``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T_BOUND = ["tests/test_bound.py", "tests/test_instances.py", "tests/test_certify.py",
           "theory/bound.py"]
T_INST = ["tests/test_instances.py", "theory/instances.py"]
T_INST_BOUND = ["tests/test_instances.py", "tests/test_bound.py", "theory/bound.py"]
T_CERT = ["tests/test_certify.py", "tests/test_symbolic.py", "theory/certify.py"]
T_SYM = ["tests/test_symbolic.py", "theory/symbolic.py"]

# (id, module, old snippet, new snippet, what the bug is, tests)
MUTANTS = [
    # ---------------------------------------------------------------- theory/bound.py
    ("B01", "theory/bound.py", "np.log1p(rest) + weighted / (1.0 + rest)",
     "np.log1p(rest) + weighted", "softmax_entropy: drop the 1/(1+R) normalisation", T_BOUND),
    ("B02", "theory/bound.py", "    with np.errstate(over=\"ignore\"):\n        neg_y = m - z",
     "    if True:\n        neg_y = m - z",
     "softmax_entropy: let m - z overflow warn (logits spanning > float64 range)", T_BOUND),
    ("B03", "theory/bound.py", "    np.put_along_axis(e, top, 0.0, axis=-1)\n",
     "", "softmax_entropy: count the maximal key in R", T_BOUND),
    ("B04", "theory/bound.py", "    np.multiply(b2, s, out=b2)                        # g = s sqrt(T / (T-1))",
     "    np.multiply(1.0, s, out=b2)", "h (array T): gap g = s, sqrt(T/(T-1)) dropped", T_BOUND),
    ("B05", "theory/bound.py", "    np.multiply(s, c, out=b2)                         # g",
     "    np.multiply(s, 1.0, out=b2)", "h (scalar T): gap g = s, sqrt(T/(T-1)) dropped", T_BOUND),
    ("B06", "theory/bound.py",
     "    np.multiply(b1, b2, out=b1, where=b1 > 0)         # g a / (1 + a); 0 where a = 0 (g = inf)",
     "    np.multiply(b1, b2, out=b1)", "h (scalar T): inf * 0 = nan at huge s", T_BOUND),
    ("B07", "theory/bound.py", "    np.log1p(b3, out=out)                             # log(1 + a), exact for tiny a",
     "    np.log(1.0 + b3, out=out)", "h (array T): log(1 + a) instead of log1p(a)", T_BOUND),
    ("B08", "theory/bound.py", "                o_c[one] = 0.0\n", "",
     "h: T = 1 rows get h_2 instead of 0 (array T)", T_BOUND),
    ("B09", "theory/bound.py",
     "        if t.size and not _is_integral(t):            # empty input is validated like any other",
     "        if False:", "entropy_lower_bound: empty input skips the seq_len check", T_BOUND),
    ("B10", "theory/bound.py", "    return 4.0 * np.finfo(np.float64).eps * (np.log(np.maximum(t - 1.0, 1.0)) + g + 4.0)",
     "    return 0.0 * np.finfo(np.float64).eps * (np.log(np.maximum(t - 1.0, 1.0)) + g + 4.0)",
     "error bound of h set to 0 (no outward rounding, no safe inverse)", T_BOUND),
    ("B11", "theory/bound.py",
     "        bad = (hs < hv * (1.0 + _h_error_bound(s * c, tv))) & (s > 0)",
     "        bad = (hs < hv) & (s > 0)",
     "max_logit_norm: final check without the error margin", T_BOUND),
    ("B12", "theory/bound.py",
     "    target = hv * (1.0 + _h_error_bound(g0 + 1.0, tv))",
     "    target = hv * 1.0", "max_logit_norm: solve for H itself (margin only in the check)",
     T_BOUND),
    ("B13", "theory/bound.py",
     "    target = hv * (1.0 + _h_error_bound(g0 + 1.0, tv))\n    below = target < np.log(tv)\n"
     "    s = np.zeros_like(hv)\n    if below.any():\n        s[below] = _root_in_g(target[below], log_tm1[below]) / c[below]\n"
     "    # lower s until the float64 value, less its error bound, is >= H (a handful of steps)\n"
     "    for k in range(54):",
     "    target = hv * 1.0\n    below = target < np.log(tv)\n"
     "    s = np.zeros_like(hv)\n    if below.any():\n        s[below] = _root_in_g(target[below], log_tm1[below]) / c[below]\n"
     "    # lower s until the float64 value, less its error bound, is >= H (a handful of steps)\n"
     "    for k in range(0):",
     "max_logit_norm: plain root, no conservative step at all (the old behaviour)", T_BOUND),
    ("B14", "theory/bound.py", "    out[h == 0] = np.inf", "    out[h == 0] = 0.0",
     "max_logit_norm: H = 0 gives 0 instead of inf", T_BOUND),
    ("B15", "theory/bound.py", "    g_hi = np.maximum(2.0 * (log_tm1 - log_hv), 3.0)",
     "    g_hi = np.maximum(0.5 * (log_tm1 - log_hv), 3.0)",
     "max_logit_norm: bracket too small for small H", T_BOUND),
    ("B16", "theory/bound.py", "    if arr.size and not (arr.min() >= lowest and np.isfinite(arr.max())):",
     "    if arr.size and not (arr.min() > lowest and np.isfinite(arr.max())):",
     "validation: s = 0 / T = 1 rejected (> instead of >=)", T_BOUND),
    ("B17", "theory/bound.py", "    if isinstance(x, (str, bytes)):\n        raise TypeError(f\"{name} must be a real number or array of real numbers, got {x!r}\")\n",
     "", "validation: no explicit string check in _real_array", T_BOUND),
    ("B18", "theory/bound.py", "    if arr.dtype == object:\n        arr = _object_to_float(arr, name)",
     "    if False:\n        arr = _object_to_float(arr, name)",
     "validation: Python ints beyond int64 rejected", T_BOUND),
    ("B19", "theory/bound.py", "        return operator.index(axis)", "        return int(axis)",
     "validation: a float axis is accepted", T_BOUND),
    ("B20", "theory/bound.py", "    z[..., top] = g - g / t", "    z[..., top] = g",
     "extremal_logits: high key not centred", T_BOUND),
    ("B21", "theory/bound.py",
     "    h[(h < np.finfo(np.float64).tiny) | ~(g <= _G_SUBNORMAL)] = 0.0",
     "    h[h < np.finfo(np.float64).tiny] = 0.0",
     "rounded-down bounds kept where e^-g is subnormal (g > 708.4)", T_INST_BOUND),
    # ------------------------------------------------------------- theory/instances.py
    ("I01", "theory/instances.py", "        return np.ldexp(m, -e), e", "        return m, e",
     "_split: exponent counted but matrix not scaled", T_INST),
    ("I02", "theory/instances.py",
     "    return _spectral_norm(m) * (1.0 + 4.0 * max(m.shape, default=1) * EPS)",
     "    return _spectral_norm(m)", "no outward margin on spectral norms", T_INST),
    ("I03", "theory/bound.py", "        h *= 1.0 - err", "        h *= 1.0",
     "instance bounds (and rounding='down') not rounded down", T_INST_BOUND),
    ("I04", "theory/instances.py", "                prefix[i] = _svd_up(Xi)",
     "                prefix[i] = _svd_up(Xn)",
     "causal per_query: ||X|| instead of ||X_i|| (valid but weaker)", T_INST),
    ("I05", "theory/instances.py", "                centred = Xi - Xi.mean(axis=0)",
     "                centred = Xi - Xn.mean(axis=0)",
     "causal centered: keys centred with the mean of all T tokens", T_INST),
    ("I06", "theory/instances.py",
     "    for weak, strong in zip(VARIANTS, VARIANTS[1:]):\n        np.minimum(out[strong], out[weak], out=out[strong])",
     "    for weak, strong in zip(VARIANTS, VARIANTS[1:]):\n        pass",
     "logit norms: order of eq. (7) not enforced", T_INST),
    ("I07", "theory/instances.py",
     "    for weak, strong in zip(VARIANTS, VARIANTS[1:]):\n        np.maximum(out[strong], out[weak], out=out[strong])",
     "    for weak, strong in zip(VARIANTS, VARIANTS[1:]):\n        pass",
     "entropy bounds: order of eq. (7) not enforced", T_INST),
    ("I08", "theory/instances.py", "        x2_n = _svd_up(Xn) ** 2 * (1 + 4 * EPS)",
     "        x2_n = _svd_up(Xn) * (1 + 4 * EPS)", "theorem: sigma_x = ||X|| instead of ||X||^2",
     T_INST),
    ("I09", "theory/instances.py", "        value = _entropy_bounds_down(np.full(T, s), np.arange(1, T + 1))",
     "        value = _entropy_bounds_down(np.full(T, s), np.full(T, T))",
     "theorem_bound(causal=True): T keys for every row", T_INST),
    ("I10", "theory/instances.py", "    ms, es = np.frexp(abs(scale))", "    ms, es = np.frexp(scale)",
     "scale enters with its sign", T_INST),
    ("I11", "theory/instances.py",
     "    return c + np.sqrt(k) * err_abs",
     "    return c", "exact: no absolute rounding term (cancellation in the logits)", T_INST),
    ("I12", "theory/instances.py",
     "        sig_n = (_svd_up(Kn @ Qn.T) + (n + 2) * EPS * fq * fk) * (1 + 2 * EPS)",
     "        sig_n = _svd_up(Kn @ Qn.T) * (1 + 2 * EPS)",
     "sigma: no absolute term for cancellation in W_K W_Q^T", T_INST),
    ("I13", "theory/bound.py",
     "    h[(h < np.finfo(np.float64).tiny) | ~(g <= _G_SUBNORMAL)] = 0.0\n", "",
     "rounded-down bounds: nothing flushed to 0 (subnormal h kept)", T_INST_BOUND),
    ("I14", "theory/instances.py", "                ai = logits_n[i, : i + 1]",
     "                ai = logits_n[i]", "causal exact: the row's masked keys counted", T_INST),
    ("I15", "theory/instances.py", "    e = int(np.frexp(peak)[1])", "    e = int(np.frexp(peak)[1]) + 1",
     "_split: off-by-one exponent (max|m'| in [1/4, 1/2))", T_INST),
    # --------------------------------------------------------------- theory/certify.py
    ("C01", "theory/certify.py", "        grad = -p * (y - mean_y)", "        grad = p * (y - mean_y)",
     "entropy gradient with the wrong sign", T_CERT),
    ("C02", "theory/certify.py", "    relative = bound < 0.5 * log_t", "    relative = False",
     "minimize_entropy: always the cancelling objective (the old behaviour)", T_CERT),
    ("C03", "theory/certify.py", "    for k in n_highs:", "    for k in n_highs[:0]:",
     "minimize_entropy: no adversarial starts", T_CERT),
    ("C04", "theory/certify.py", "    gap = 2.0 * b", "    gap = b",
     "box_min_entropy: gap b instead of 2b", T_CERT),
    ("C05", "theory/certify.py", "    g = s * mpmath.sqrt(mpmath.mpf(t) / (t - 1))",
     "    g = s * mpmath.sqrt(mpmath.mpf(t) / t)", "mpmath h: sqrt(T/(T-1)) dropped", T_CERT),
    ("C06", "theory/certify.py", "    bound = float(np.sqrt(max(r * c - ratio_sum, 0.0) / min(r, c)))",
     "    bound = float(np.sqrt(max(r * c - ratio_sum, 0.0) / max(r, c)))",
     "Prop. 3.2: divide by max(r, c) (valid but weaker for rectangles)", T_CERT),
    ("C07", "theory/certify.py", "    ratio_sum = float(np.sum((n / denom) ** 2))",
     "    ratio_sum = float(np.sum(n / denom))", "Prop. 3.2: ratios not squared", T_CERT),
    ("C08", "theory/certify.py", "    return OneHotCounterexample(naive, box, bool(box.value < naive))",
     "    return OneHotCounterexample(naive, box, bool(box.value <= naive))",
     "one_hot_counterexample: a tie counts as a counterexample", T_CERT),
    ("C09", "theory/certify.py", "        h = np.log1p(rest) + weighted / denom",
     "        h = np.log(1.0 + rest) + weighted / denom",
     "certify entropy: log(1 + R) loses tiny entropies", T_CERT),
    ("C10", "theory/certify.py",
     "    balanced = float(softmax_entropy(s * _two_valued_direction(max(t // 2, min(2, t - 1)), t)))",
     "    balanced = float(softmax_entropy(s * _two_valued_direction(1, t)))",
     "minimize_entropy: spread measured at the extremal row itself (always 0)", T_CERT),
    # -------------------------------------------------------------- theory/symbolic.py
    ("S01", "theory/symbolic.py",
     "                   -(T - 2) / (3 * sp.sqrt(T - 1) * T ** sp.Rational(3, 2)))",
     "                   -(T - 2) / (3 * sp.sqrt(T - 1) * T ** 2))", "c3 with T^2", T_SYM),
    ("S02", "theory/symbolic.py",
     "    d_dg = _claim(\"dh/dg = -g a/(1+a)^2\", sp.diff(_h_of_g(g, m), g), -g * a / (1 + a) ** 2)",
     "    d_dg = _claim(\"dh/dg = -g a/(1+a)^2\", sp.diff(_h_of_g(g, m), g), -g * a / (1 + a))",
     "dh/dg with (1 + a) instead of (1 + a)^2", T_SYM),
    ("S03", "theory/symbolic.py",
     "    return g_of_s, _h_of_g(g_of_s, m) / (m * (1 + g_of_s) * sp.exp(-g_of_s))",
     "    return g_of_s, _h_of_g(g_of_s, m) / (m * g_of_s * sp.exp(-g_of_s))",
     "large-s asymptotic with (T-1) g e^{-g}", T_SYM),
    ("S04", "theory/symbolic.py",
     "sum(d**2 for d in delta), width**2 * (1 - ratio_sum / width**2))",
     "sum(d**2 for d in delta), width * (1 - ratio_sum / width**2))",
     "Prop. 3.2 Frobenius identity with w instead of w^2", T_SYM),
    ("S05", "theory/symbolic.py", "    return _h_of_g(s * sp.sqrt(T / (T - 1)), T - 1)",
     "    return _h_of_g(s, T - 1)", "entropy_bound_expr: gap s", T_SYM),
]


def copy_tree(dst):
    """The package, the theory tests and the pytest configuration, into ``dst``."""
    shutil.copytree(ROOT / "theory", dst / "theory",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dst / "tests").mkdir()
    for name in ("conftest.py", "test_bound.py", "test_instances.py", "test_certify.py",
                 "test_symbolic.py"):
        shutil.copy2(ROOT / "tests" / name, dst / "tests" / name)
    shutil.copytree(ROOT / "tests" / "reference", dst / "tests" / "reference")
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def run_tests(workdir, tests, timeout):
    env = dict(os.environ, PYTHONPATH=str(workdir), HYPOTHESIS_PROFILE="ci",
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-m", "not slow", "--rootdir", str(workdir), *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "timed out", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if proc.returncode == 0:
        return "survived", "", dt
    first = failed[0] if failed else proc.stdout.strip().splitlines()[-1:] or ["?"]
    first = first if isinstance(first, str) else first[0]
    return "killed", first.split(" - ")[0].replace("FAILED ", "").replace("ERROR ", ""), dt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-theory-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        originals = {p: (work / p).read_text() for p in {m[1] for m in MUTANTS}}
        for mid, path, old, new, *_ in MUTANTS:        # every snippet must still be there
            count = originals[path].count(old)
            if count != 1:
                sys.exit(f"mutant {mid}: snippet occurs {count} times in {path}; update the list")
        probe = subprocess.run([sys.executable, "-c", "import theory; print(theory.__file__)"],
                               cwd=work, env=dict(os.environ, PYTHONPATH=str(work)),
                               capture_output=True, text=True, check=True).stdout.strip()
        if not probe.startswith(str(work)):
            sys.exit(f"the copy is not what gets imported ({probe})")
        status, detail, dt = run_tests(work, sorted({t for m in mutants for t in m[5]}),
                                       args.timeout * 4)
        if status != "survived":
            sys.exit(f"baseline fails: {detail}")
        print(f"baseline passes ({dt:.0f} s); {len(mutants)} mutants", flush=True)
        rows = []
        for mid, path, old, new, what, tests in mutants:
            (work / path).write_text(originals[path].replace(old, new, 1))
            try:
                status, detail, dt = run_tests(work, tests, args.timeout)
            finally:
                (work / path).write_text(originals[path])
            rows.append((mid, path, what, status, detail, dt))
            print(f"{mid}  {status:<8} {dt:5.1f}s  {what}  {detail}", flush=True)
    killed = sum(r[3] != "survived" for r in rows)
    total = time.perf_counter() - start
    lines = ["| id | module | deliberate bug | result | first failing test |",
             "|---|---|---|---|---|"]
    lines += [f"| {m} | `{p.split('/')[-1]}` | {w.replace('||', '‖').replace('|', '/')} | {s} | "
              f"{('`' + d + '`') if d else ''} |" for m, p, w, s, d, _ in rows]
    summary = (f"kill rate {killed}/{len(rows)} = {killed / len(rows):.0%} "
               f"({len(rows) - killed} survived); {total:.0f} s in all")
    print(summary)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n\n" + summary + "\n")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
