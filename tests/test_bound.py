"""Claims about h_T(s), its inverse, the extremal row and the stable entropy (theory/bound.py).

Equation numbers refer to theory/README.md. Tolerances are stated where used, in units of
float64 eps = 2.2e-16 where that is the natural unit.
"""
from __future__ import annotations

import json
from pathlib import Path

import mpmath
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import example, given
from hypothesis import strategies as st

from theory.bound import entropy_lower_bound, extremal_logits, max_logit_norm, softmax_entropy

EPS = np.finfo(np.float64).eps
TINY = np.finfo(np.float64).tiny
REF = json.loads((Path(__file__).parent / "reference" / "bound_reference.json").read_text())


def _reference():
    s = np.array([float(x) for x in REF["logit_norm"]])
    t = np.array(REF["seq_len"], dtype=np.float64)
    h = np.array([float(x) for x in REF["h"]])        # correctly rounded to float64
    return s, t, h


# ----------------------------------------------------------------- accuracy vs mpmath
def test_reference_data_is_what_the_script_generates():
    """The committed values are h_T(s) at 50 digits (spot-check through theory.certify)."""
    from theory.certify import entropy_lower_bound_mp
    s, t, h = _reference()
    idx = np.linspace(0, len(s) - 1, 25).astype(int)
    mp = entropy_lower_bound_mp(s[idx], t[idx].astype(np.int64), dps=50).astype(float)
    np.testing.assert_array_equal(mp, h[idx])


@pytest.mark.parametrize("path", ["array_T", "scalar_T"])
def test_relative_error_below_1e_12_against_50_digit_mpmath(path):
    """rel. err <= 1e-12 wherever h is a normal float64, for s in [0, 1e4], T in [1, 1e12].

    Error budget: forming g = s sqrt(T/(T-1)) costs ~3 ulp; exp(log(T-1) - g) then has relative
    error ~ (log(T-1) + g) * 3 eps <= 760 * 3 eps = 5e-13 for a normal result. No overflow,
    division, invalid-operation or underflow warning may occur (numpy is told to raise: a
    value below the normal range underflows towards 0 silently, by design).
    """
    s, t, ref = _reference()
    with np.errstate(all="raise"):
        if path == "array_T":
            h = entropy_lower_bound(s, t)
        else:
            h = np.empty_like(s)
            for tv in np.unique(t):
                m = t == tv
                h[m] = entropy_lower_bound(s[m], int(tv))
    normal = ref >= TINY
    assert normal.sum() > 1500
    rel = np.abs(h[normal] - ref[normal]) / ref[normal]
    assert rel.max() <= 1e-12, (rel.max(), s[normal][rel.argmax()], t[normal][rel.argmax()])
    # below the normal range the value may underflow towards 0, but never by more than TINY
    assert np.all(np.abs(h[~normal] - ref[~normal]) <= TINY)
    assert np.all(h >= 0)


def test_naive_formula_loses_what_the_closed_form_keeps():
    """The textbook form of eq. (1) underflows to 0 or loses digits where eq. (2) as coded
    does not (the reason for the form of entropy_lower_bound)."""
    s, t, ref = _reference()
    normal = (ref >= TINY) & (t >= 2)
    s, t, ref = s[normal], t[normal], ref[normal]
    with np.errstate(all="ignore"):
        beta = np.exp(-s * np.sqrt(t / (t - 1)))
        naive = np.log(1 + (t - 1) * beta) + s * np.sqrt(t * (t - 1)) * beta / (1 + (t - 1) * beta)
    naive_err = np.abs(naive - ref) / ref
    ours_err = np.abs(entropy_lower_bound(s, t) - ref) / ref
    assert naive_err.max() > 1e-3 > 1e-12 >= ours_err.max()


# ----------------------------------------------------------------- exact edge values
@pytest.mark.parametrize("t", [1, 2, 3, 10, 4096, 10**12])
def test_zero_norm_gives_log_t(t):
    """s = 0: only the uniform row, entropy log T (eq. (2) with g = 0, a = T - 1); 2 eps."""
    assert entropy_lower_bound(0.0, t) == pytest.approx(np.log(t), rel=2 * EPS, abs=0)
    assert entropy_lower_bound([0.0], [t])[0] == pytest.approx(np.log(t), rel=2 * EPS, abs=0)


@pytest.mark.parametrize("s", [0.0, 1e-12, 1.0, 1e4])
def test_one_key_gives_zero(s):
    assert entropy_lower_bound(s, 1) == 0.0
    assert np.all(entropy_lower_bound([s, s], [1, 1]) == 0.0)
    assert np.all(entropy_lower_bound(np.full(3, s), np.array([1, 2, 1]))[[0, 2]] == 0.0)


def test_broadcasting_and_shapes():
    s = np.linspace(0, 5, 6).reshape(2, 3)
    t = np.array([2, 7, 40])
    h = entropy_lower_bound(s, t)
    assert h.shape == (2, 3) and h.dtype == np.float64
    expected = [[entropy_lower_bound(s[i, j], t[j]) for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(h, expected, rtol=4 * EPS, atol=0)   # scalar vs SIMD log/exp
    assert np.ndim(entropy_lower_bound(1.0, 5)) == 0
    big = np.linspace(0, 30, 20_001)                       # several chunks, both code paths
    np.testing.assert_allclose(entropy_lower_bound(big, np.full(big.shape, 9)),
                               entropy_lower_bound(big, 9), rtol=4 * EPS, atol=0)


# ----------------------------------------------------------------- monotonicity
@given(st.floats(0, 1e3), st.floats(0, 1e3), st.integers(1, 10**6))
@example(0.0, 1e-300, 2)
@example(700.0, 700.5, 10**6)
@example(0.0, 1e3, 1)
def test_decreasing_in_logit_norm(s1, s2, t):
    """dh/dg <= 0, eq. (2). The true decrease can be below one ulp (s^2/(2T), eq. (8)), so
    the float64 values may tie or invert by the rounding of each, <= 2 eps relative."""
    lo, hi = min(s1, s2), max(s1, s2)
    assert entropy_lower_bound(lo, t) >= entropy_lower_bound(hi, t) * (1 - 2 * EPS)


@given(st.floats(0, 1e3), st.integers(1, 10**9), st.integers(1, 10**9))
@example(0.0, 1, 2)
@example(1e3, 10**9 - 1, 10**9)
@example(0.5, 1, 10**9)
def test_increasing_in_seq_len(s, t1, t2):
    """h_T(s) increases in T (theory/README.md, step 6): deleting the least likely key of a
    row of T+1 keys lowers its entropy (by >= p_min log((T+1)/T)) and does not raise its
    centred norm, so h_{T+1}(s) >= h_T(s). (Adding a key at the mean would run the wrong
    way: it shows only that the *largest* entropy at a given norm grows.)"""
    lo, hi = min(t1, t2), max(t1, t2)
    assert entropy_lower_bound(s, lo) <= entropy_lower_bound(s, hi) * (1 + 4 * EPS)


def test_small_and_large_norm_asymptotics():
    """eq. (8): h = log T - s^2/(2T) + O(s^3); eq. (9): h ~ (T-1)(1+g)e^{-g}."""
    t = 50
    s = np.array([1e-3, 1e-4])
    err = np.abs(entropy_lower_bound(s, t) - (np.log(t) - s**2 / (2 * t)))
    assert np.all(err <= s**3 + 4 * EPS * np.log(t))


@pytest.mark.parametrize("t", [2, 3, 50, 10**6])
def test_large_norm_asymptotic_is_tight_enough_to_reject_wrong_forms(t):
    """eq. (9): h / ((T-1)(1+g)e^{-g}) = 1 - O(a), a = (T-1)e^{-g}: exactly,
    log1p(a) + g a/(1+a) = a(1+g)(1 + r) with |r| <= a. So |ratio - 1| <= a + the float64
    error 4 eps (log(T-1) + g + 4) of each side: at g >= 30 that is ~1e-12, far below the
    1/g by which the wrong form (T-1) g e^{-g} differs (and e^{-0.4 g}, dropped sqrt(T/(T-1)))."""
    s = np.array([30.0, 60.0, 200.0, 400.0, 480.0])     # e^{-g} a normal float64
    g = s * np.sqrt(t / (t - 1))
    with np.errstate(under="ignore"):
        a = (t - 1) * np.exp(-g)
        h = entropy_lower_bound(s, t)
        ratio = h / ((t - 1) * (1 + g) * np.exp(-g))
        wrong = h / ((t - 1) * g * np.exp(-g))
    tol = a + 2 * 4 * EPS * (np.log(t - 1) + g + 4)
    assert np.all(np.abs(ratio - 1) <= tol), (ratio - 1, tol)
    assert np.all(np.abs(wrong - 1) > 100 * tol)
    # and against 50-digit mpmath, the same bound on the remainder
    from theory.certify import entropy_lower_bound_mp
    with mpmath.workdps(50):
        for si in s:
            gm = mpmath.mpf(si) * mpmath.sqrt(mpmath.mpf(t) / (t - 1))
            am = (t - 1) * mpmath.exp(-gm)
            r = entropy_lower_bound_mp(si, t) / (am * (1 + gm)) - 1
            assert -am <= r <= mpmath.mpf(10) ** -45      # r <= 0 up to the 50 digits


def test_huge_norms_and_ranges_give_zero_without_warnings():
    """Issue 13, 1: s near the float64 maximum makes g overflow to inf; h is then 0, not nan
    (no inf * 0); logits spanning more than the float64 range have entropy 0, not a warning."""
    with np.errstate(all="raise"):
        assert entropy_lower_bound(1.7e308, 2) == 0.0
        np.testing.assert_array_equal(entropy_lower_bound([1.7e308, np.finfo(float).max], [2, 10**12]), 0.0)
        assert softmax_entropy([1e308, -1e308]) == 0.0
        assert softmax_entropy([np.finfo(float).max, -np.finfo(float).max, 0.0]) == 0.0
        h = softmax_entropy([[1e308, -1e308, 1e308], [0.0, -1e308, 0.0]])
        np.testing.assert_allclose(h, np.log(2), rtol=4 * EPS)


# ----------------------------------------------------------------- the inverse
def _h_exact(s, t):
    from theory.certify import entropy_lower_bound_mp
    return entropy_lower_bound_mp(float(s), int(t), dps=60)


@given(st.one_of(st.floats(1e-300, 1), st.floats(1 - 1e-6, 1),
                 st.floats(0, 60).map(lambda k: 1 - 2.0 ** -k)),
       st.one_of(st.integers(2, 100), st.integers(2, 10**12)))
@example(1.0, 2)
@example(1 - 2**-52, 2)
@example(1 - 2**-52, 10**12)
@example(0.5, 3)
@example(1e-300, 10**12)
def test_max_logit_norm_is_conservative_against_mpmath(frac, t):
    """Issue 13, 5: every s returned has h_T(s) >= H exactly (60-digit mpmath), so every row
    within norm s has entropy >= H; and it is not needlessly small: h_T(s) - H <= 4e-12 H,
    the error bound of the float evaluation it guards against (about 1e-12 at g ~ 700)."""
    target = frac * np.log(t)
    if target == 0:
        return
    s = max_logit_norm(target, t)
    assert 0 <= s < np.inf
    with mpmath.workdps(60):
        h = _h_exact(s, t)
        # H = float(log T) may exceed the exact log T by half an ulp: then s = 0 is the best
        want = min(mpmath.mpf(float(target)), mpmath.log(t))
        assert h >= want
        if s > 0:
            assert h - want <= 4e-12 * target


@given(st.floats(1e-300, 1), st.integers(2, 10**9))
@example(1.0, 2)
@example(0.9999999999999999, 438)
@example(1e-300, 2)
@example(1e-9, 2)
@example(0.5, 10**9)
def test_max_logit_norm_round_trip(frac, t):
    """h_T(max_logit_norm(H, T)) = H to 1e-10 (eq. (10)), H = frac * log T in (0, log T]
    a normal float64 (a subnormal H has fewer than 16 digits to return)."""
    target = frac * np.log(t)
    s = max_logit_norm(target, t)
    assert s >= 0
    assert entropy_lower_bound(s, t) == pytest.approx(target, rel=1e-10, abs=0)


@given(st.one_of(st.floats(1e-3, 480), st.floats(1e-8, 1e-3)), st.integers(2, 10**6))
@example(1e-3, 2)
@example(480.0, 2)
@example(480.0, 10**6)
@example(1e-8, 2)
@example(1e-6, 10**6)
def test_max_logit_norm_inverts_in_s(s, t):
    """s -> h_T(s) -> s, for s where h_T(s) is a normal float64. Tolerance: the relative error
    e = 4 eps (log(T-1) + g + 4) in h (plus the conservative step of the same size) amplified
    by the condition number |h / (s h'(s))|, ~ 2 T log T / s^2 at small s (eq. (8)) and
    <= 1 at large s. Below s ~ sqrt(T eps) the round trip cannot resolve s at all (h(s) rounds
    to log T); then the answer may be 0, never larger than needed."""
    h = entropy_lower_bound(s, t)
    g = s * np.sqrt(t / (t - 1))
    cond = max(1.0, 2 * t * np.log(t) / s**2)
    err = 4 * EPS * (np.log(t - 1) + g + 4)
    back = max_logit_norm(h, t)
    if 2 * err * cond >= 1:                 # unresolvable: only "not above s by more than e"
        assert back <= s * (1 + 1e-9) or h == np.log(t)
    else:
        assert back == pytest.approx(s, rel=3 * err * cond + 1e-13, abs=0)


def test_empty_input_is_treated_alike():
    """Issue 13, 6: empty arrays give empty results from every function, after the same checks
    as non-empty ones (a fractional T is an error either way)."""
    for fn in (entropy_lower_bound, max_logit_norm):
        out = fn(np.zeros(0), 5)
        assert out.shape == (0,) and out.dtype == np.float64
        assert fn(np.zeros((0, 3)), np.array([2, 3, 4])).shape == (0, 3)
        with pytest.raises(ValueError, match="seq_len"):
            fn([], 2.5)
        with pytest.raises(ValueError, match="seq_len"):
            fn([], 0)
        with pytest.raises(TypeError):
            fn(np.array([], dtype=str), 5)
    assert softmax_entropy(np.zeros((0, 4))).shape == (0,)
    assert extremal_logits(np.zeros(0), 4).shape == (0, 4)


def test_integers_beyond_int64_are_their_float():
    """Issue 13, 6: Python ints too large for int64 are taken as their float64 value."""
    assert entropy_lower_bound(1.0, 10**20) == entropy_lower_bound(1.0, 1e20)
    assert entropy_lower_bound(10**20, 3) == entropy_lower_bound(1e20, 3) == 0.0
    np.testing.assert_array_equal(entropy_lower_bound([1.0, 2.0], [10**20, 3]),
                                  entropy_lower_bound([1.0, 2.0], [1e20, 3]))
    assert max_logit_norm(1.0, 10**20) == max_logit_norm(1.0, 1e20)
    with pytest.raises(ValueError, match="seq_len"):
        entropy_lower_bound(1.0, 10**400)
    with pytest.raises(TypeError, match="seq_len"):
        entropy_lower_bound(1.0, [10**20, "3"])


def test_max_logit_norm_edges_and_vectorization():
    assert max_logit_norm(0.0, 5) == np.inf
    assert max_logit_norm(0.0, 1) == np.inf
    assert max_logit_norm(np.log(7), 7) == 0.0
    hs = np.array([[0.1, 1.0], [2.0, 0.0]])
    out = max_logit_norm(hs, 100)
    assert out.shape == (2, 2) and out[1, 1] == np.inf
    np.testing.assert_allclose(entropy_lower_bound(out[np.isfinite(out)], 100),
                               hs[np.isfinite(out)], rtol=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        max_logit_norm(np.log(5) + 1e-6, 5)
    with pytest.raises(ValueError, match="entropy"):
        max_logit_norm(-0.1, 5)
    with pytest.raises(ValueError, match="entropy"):
        max_logit_norm(0.1, 1)


# ----------------------------------------------------------------- extremal row, minimality
@given(st.floats(0, 60), st.integers(1, 512), st.data())
@example(0.0, 1, None)
@example(0.0, 2, None)
@example(60.0, 2, None)
@example(60.0, 512, None)
@example(1e-9, 512, None)
@example(2.2250738585e-313, 2, None)
def test_extremal_row_attains_the_bound(s, t, data):
    """eq. (5): z* has centred norm s and entropy h_T(s). Tolerance 1e-12 relative: both sides
    are computed to a few ulp of logits of size g <= 85, amplified by at most ~g."""
    top = data.draw(st.integers(0, t - 1)) if data is not None else t - 1
    z = extremal_logits(s, t, top=top)
    assert z.shape == (t,)
    if s > 0 and t > 1:
        assert np.argmax(z) == top
    if s >= TINY and t > 1:    # a subnormal s has fewer than 16 digits to reproduce
        # (divide by s first: squares of entries ~1e-200 would underflow)
        assert np.linalg.norm((z - z.mean()) / s) == pytest.approx(1.0, rel=1e-13)
    elif s == 0 or t == 1:   # s = 0, or one key: the centred row is 0 whatever s is, and h_1 = 0
        assert np.all(z == 0)
    assert softmax_entropy(z) == pytest.approx(entropy_lower_bound(s, t), rel=1e-12, abs=1e-300)


@given(st.integers(0, 2**32 - 1), st.floats(0, 60), st.integers(1, 512), st.floats(-1e3, 1e3))
@example(0, 0.0, 1, 0.0)
@example(1, 0.0, 2, 5.0)
@example(2, 60.0, 2, 0.0)
@example(3, 60.0, 512, -1e3)
@example(4, 1e-8, 512, 0.0)
def test_every_row_with_that_norm_has_at_least_h(seed, s, t, shift):
    """A random row z = shift + s * (unit centred direction): Ent(softmax(z)) >= h_T(s), the
    minimality claim of eq. (5)-(6). Tolerance 1e-9 relative: s is reproduced from z to ~T eps,
    and h's relative sensitivity to s is <= g ~ 85 here (eq. (9)), so < 1e-11 would do."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(t)
    u -= u.mean()
    nrm = np.linalg.norm(u)
    z = shift + (s * u / nrm if nrm > 0 else u * 0)
    centred = np.linalg.norm(z - z.mean())
    assert softmax_entropy(z) >= entropy_lower_bound(centred, t) * (1 - 1e-9)


def _scaled_norm(c):
    """Row norms without overflow or underflow of squares (rows of any magnitude)."""
    m = np.max(np.abs(c), axis=-1, keepdims=True)
    m = np.where(m > 0, m, 1.0)
    return m[..., 0] * np.linalg.norm(c / m, axis=-1)


@given(st.integers(0, 2**32 - 1), st.integers(2, 64), st.floats(-300, 300),
       st.floats(0, 300), st.sampled_from(["random", "near-extremal", "two-level"]))
@example(0, 2, -300.0, 0.0, "random")
@example(1, 64, 300.0, 0.0, "near-extremal")
@example(2, 10, 0.0, 3.0, "near-extremal")
@example(3, 10, 1.0, 1.0, "two-level")
def test_thousands_of_rows_lie_above_h_of_their_centred_norm(seed, t, log10_mid, spread, kind):
    """eqs. (2), (5)-(6) on 2048 rows per example (~200k in the default profile): every row
    z has Ent(softmax(z)) >= h_T(||z - mean z||). Magnitudes 10^(mid +- spread) up to 1e300;
    "near-extremal" rows are z* of eq. (5) plus noise 1e-6 |z*| (T up to 64, not only T = 2);
    "two-level" rows have k high keys, the other stationary points of eq. (6).
    Tolerance: the float64 error of h, 4 eps (log(T-1) + g + 4), plus that of the measured
    entropy and of the norm (~T eps relative, amplified by g): 8 eps (log T + (1+T) g + T + 8),
    and TINY absolute where values are subnormal."""
    rng = np.random.default_rng(seed)
    n = 2048
    mag = 10.0 ** np.clip(log10_mid + spread * rng.uniform(-1, 1, n), -300, 300)
    if kind == "random":
        z = rng.standard_normal((n, t))
    else:
        k = np.ones(n, dtype=int) if kind == "near-extremal" else rng.integers(1, t, n)
        z = (np.arange(t) < k[:, None]).astype(float) - k[:, None] / t
        z = z + (1e-6 * rng.standard_normal((n, t)) if kind == "near-extremal" else 0.0)
    z = z / _scaled_norm(z)[:, None] * mag[:, None] + rng.uniform(-1e3, 1e3, (n, 1))
    s = _scaled_norm(z - z.mean(axis=1, keepdims=True))
    with np.errstate(all="raise"):
        ent = softmax_entropy(z)
        h = entropy_lower_bound(s, t)
    g = np.minimum(s * np.sqrt(t / (t - 1)), 1e300)
    tol = 8 * EPS * (np.log(t) + (1 + t) * g + t + 8)
    # (below the normal range, TINY = 2.2e-308, digits are lost to gradual underflow)
    assert np.all(ent >= h * (1 - tol) - TINY), float(np.max((h - ent) / np.maximum(h, 1e-300)))


@given(st.one_of(st.floats(0, 60), st.floats(60, 760), st.floats(0, 1e-3)),
       st.integers(1, 4096), st.data())
@example(0.0, 1, None)
@example(0.0, 4096, None)
@example(745.0, 2, None)
@example(1.3112702645341956, 2, None)
@example(715.0450669341373, 87, None)      # h normal, e^-g subnormal: the measurement is short
@example(716.1043952304093, 259, None)     # of digits, so the rounded-down value is 0 there
def test_rounded_down_h_never_exceeds_the_measured_entropy_of_the_extremal_row(s, t, data):
    """Issue 13, 2: entropy_lower_bound(s, T, rounding="down") <= softmax_entropy of the row
    z* of eq. (5) with that norm, with no tolerance, and <= the exact h_T(s) (50-digit
    mpmath); it is below the nearest value by at most its error bound."""
    from theory.certify import entropy_lower_bound_mp
    top = data.draw(st.integers(0, t - 1)) if data is not None else 0
    down = entropy_lower_bound(s, t, rounding="down")
    assert down <= softmax_entropy(extremal_logits(s, t, top=top))
    assert mpmath.mpf(float(down)) <= entropy_lower_bound_mp(s, t, dps=50)
    near = entropy_lower_bound(s, t)
    g = s * np.sqrt(t / max(t - 1, 1))
    if near >= TINY and g <= -np.log(TINY):           # else 0 by design
        assert down >= near * (1 - 2 * 4 * EPS * (np.log(max(t - 1, 1)) + g + 4))
    with pytest.raises(ValueError, match="rounding"):
        entropy_lower_bound(s, t, rounding="up")
    with pytest.raises(TypeError, match="rounding"):
        entropy_lower_bound(s, t, rounding=None)


# ----------------------------------------------------------------- the stable entropy
@given(st.integers(0, 2**32 - 1), st.integers(1, 512), st.floats(0, 60), st.floats(-1e3, 1e3))
@example(0, 1, 0.0, 1e3)
@example(1, 2, 60.0, -1e3)
@example(2, 512, 60.0, 1e3)
def test_entropy_invariant_to_shift_and_permutation(seed, t, s, shift):
    """eq. (4): softmax ignores shifts; the entropy ignores the key order. Shifting by c
    perturbs each logit by <= eps (|c| + max|z|) and |dH/dz_k| = p_k |z_k - E_p z| sums to at
    most the range r of z (eq. (6)), so |dH| <= 2 eps (|c| + max|z|) r; a permutation only
    reorders sums (a few eps of H)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(t)
    z = s * z / max(np.linalg.norm(z), 1e-300)
    h = softmax_entropy(z)
    r = np.ptp(z)
    tol = 4 * EPS * (abs(shift) + np.abs(z).max()) * r + 16 * EPS * max(h, 1e-300)
    assert abs(softmax_entropy(z + shift) - h) <= tol + 1e-300
    assert softmax_entropy(rng.permutation(z)) == pytest.approx(h, rel=16 * EPS, abs=1e-300)


@given(st.integers(0, 2**32 - 1), st.integers(1, 64), st.floats(0, 30))
def test_entropy_matches_scipy_twin(seed, t, s):
    """Numerical twin: scipy.stats.entropy(scipy.special.softmax(z)); 1e-12 relative (the twin's
    log p loses ~|log p| eps per key, 1e-12 covers rows whose entropy is >= 1e-3)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(t) * s / np.sqrt(t)
    ours = softmax_entropy(z)
    twin = scipy.stats.entropy(scipy.special.softmax(z))
    assert ours == pytest.approx(twin, rel=1e-12, abs=1e-14)


def test_masked_keys_contribute_nothing():
    z = np.array([[1.0, -np.inf, 0.5, -2.0], [-np.inf, -np.inf, 3.0, -np.inf]])
    h = softmax_entropy(z)
    assert h[0] == pytest.approx(softmax_entropy([1.0, 0.5, -2.0]), rel=4 * EPS)
    assert h[1] == 0.0
    np.testing.assert_allclose(softmax_entropy(z.T, axis=0), h, rtol=0, atol=0)


def test_nearly_one_hot_row_keeps_its_digits():
    """For z = (g, 0, ..., 0) minus the mean, H = log(1 + a) + g a/(1 + a), a = (T-1)e^{-g}:
    a naive sum over p log p would round log(1 + a) away; ours is exact to a few ulp."""
    g, t = 60.0, 4
    z = np.zeros(t)
    z[0] = g
    a = (t - 1) * np.exp(-g)
    expected = np.log1p(a) + g * a / (1 + a)
    assert softmax_entropy(z) == pytest.approx(expected, rel=1e-14)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("s, t, match", [
    (-1.0, 4, "logit_norm"), (np.nan, 4, "logit_norm"), (np.inf, 4, "logit_norm"),
    (1.0, 0, "seq_len"), (1.0, 2.5, "seq_len"), (1.0, np.inf, "seq_len"),
    ([1.0, 2.0], [2, 3, 4], "do not broadcast"),
])
def test_entropy_lower_bound_rejects_bad_input(s, t, match):
    with pytest.raises(ValueError, match=match):
        entropy_lower_bound(s, t)


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="logit_norm must be a real number .*got '1.0'"):
        entropy_lower_bound("1.0", 3)             # the message shows the string itself
    with pytest.raises(TypeError, match="seq_len .*got b'3'"):
        entropy_lower_bound(1.0, b"3")
    with pytest.raises(TypeError, match="seq_len"):
        entropy_lower_bound(1.0, "3")
    with pytest.raises(TypeError, match="entropy"):
        max_logit_norm("0.5", 3)
    with pytest.raises(TypeError, match="logits"):
        softmax_entropy("1.0")
    with pytest.raises(TypeError, match="axis"):
        softmax_entropy(np.ones((2, 3)), axis=1.0)
    with pytest.raises(TypeError, match="axis"):
        softmax_entropy(np.ones((2, 3)), axis=True)
    assert softmax_entropy(np.ones((2, 3)), axis=np.int64(0)).shape == (3,)
    with pytest.raises(TypeError, match="logits"):
        softmax_entropy(np.array([True, False]))
    with pytest.raises(TypeError, match="top"):
        extremal_logits(1.0, 4, top=1.5)


@pytest.mark.parametrize("logits, match", [
    ([1.0, np.nan], "nan"), ([np.inf, 0.0], r"\+inf"), ([-np.inf, -np.inf], "masked"),
    (np.zeros((2, 0)), "no keys"), (3.0, "dimension"),
])
def test_softmax_entropy_rejects_bad_input(logits, match):
    with pytest.raises(ValueError, match=match):
        softmax_entropy(logits)


def test_extremal_logits_rejects_bad_input():
    with pytest.raises(ValueError, match="top"):
        extremal_logits(1.0, 4, top=4)
    with pytest.raises(ValueError, match="seq_len"):
        extremal_logits(1.0, [4, 5])
    with pytest.raises(ValueError, match="logit_norm"):
        extremal_logits(-1.0, 4)
    z = extremal_logits(np.array([0.5, 1.0, 2.0]), 6, top=2)
    assert z.shape == (3, 6)
    np.testing.assert_allclose(softmax_entropy(z), entropy_lower_bound([0.5, 1.0, 2.0], 6),
                               rtol=1e-13)


def test_no_floating_point_warnings_at_the_extremes_of_every_function():
    """Issue 13: with numpy told to raise on everything (underflow included), no public function
    of theory/ warns at the extremes of its inputs: s from 5e-324 to the float64 maximum, T up
    to 1e20, subnormal H, tokens and weights from 1e-300 to 1e300, box bounds up to 1e300."""
    import theory
    from theory.certify import box_min_entropy_search
    big = np.finfo(float).max
    with np.errstate(all="raise"):
        for s in (0.0, 5e-324, 1e-300, 1.0, 745.0, 1e300, big):
            entropy_lower_bound(s, [1, 2, 3, 10**12, 10**20])
        for s in (5e-324, 1e-300, 1e300):
            softmax_entropy(extremal_logits(s, 3))
        for h in (5e-324, 1e-310, 1e-300, 0.5):
            max_logit_norm(h, [3, 10**12, 10**20])
        for s in (1e-8, 60.0, 1e5):
            theory.minimize_entropy(s, 4, restarts=1)
        for b in (1e-300, 1e3, 1e300):
            theory.box_min_entropy(b, 6)
            box_min_entropy_search(b, 3, restarts=2)
        for mag in (1e-300, 1e-160, 1e160, 1e300):
            X, W = np.eye(3) * mag, np.eye(3) / mag
            for causal in (False, True):
                theory.theorem_bound(X, W, W, causal=causal)
                theory.row_entropy_bounds(X, W, W, causal=causal)
                theory.row_entropy_bounds(X, W * mag, W * mag, causal=causal)
                theory.row_entropy_bounds(X, W, np.zeros((3, 3)), causal=causal)
        theory.adam_update_bound([[1e-300, 1e300]], [[1e300, 0.0]])
    with pytest.raises(ValueError, match="logit_norm"):
        extremal_logits(big, 3)                        # its logits would overflow


def test_max_logit_norm_subnormal_entropy_is_still_conservative():
    """A subnormal H has no relative accuracy to guard; it is asked as the smallest normal
    float64 (a stronger requirement), so h_T(s) >= H still holds exactly."""
    from theory.certify import entropy_lower_bound_mp
    for h in (5e-324, 1e-310):
        for t in (2, 10**12):
            s = max_logit_norm(h, t)
            assert s == max_logit_norm(TINY, t)
            with mpmath.workdps(60):
                assert entropy_lower_bound_mp(float(s), t, dps=60) >= mpmath.mpf(TINY)


def test_no_floating_point_warnings_anywhere():
    """Underflow to 0 (far-below-max keys, tiny bounds) is by design and silent; nothing
    overflows, divides by zero or goes invalid, even with numpy told to raise on everything."""
    with np.errstate(all="raise"):
        softmax_entropy([[0.0, -1e4, -np.inf, 5.0], [800.0, -800.0, 0.0, 1.0]])
        entropy_lower_bound(np.array([0.0, 1e4, 5e-324]), np.array([1, 2, 10**12]))
        max_logit_norm(np.array([1e-300, 1e-10, 1.0]), np.array([2, 10**12, 3]))
        extremal_logits(1e4, 10**4)
