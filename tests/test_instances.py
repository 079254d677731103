"""Claims about the bound on concrete attention instances (theory/instances.py).

Equation numbers refer to theory/README.md. Logits follow the project convention
a = (X W_Q)(X W_K)^T * scale, row i = query i over the keys; masked keys are -inf.

Tolerance for "entropy >= bound" (TOL_REL = 1e-9 relative): the bound's s_i comes from
spectral norms and the row itself in float64 (relative error <= ~T eps ~ 3e-14 for T <= 128)
and h's relative sensitivity to s is at most ~g (eq. (9)); logit norms here stay below ~300,
so the slack needed is < 1e-10. Inputs in float32 are converted to float64 once, and both the
bound and the entropy are computed from that same float64 instance.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from theory.bound import entropy_lower_bound, softmax_entropy
from theory.instances import (
    VARIANTS,
    extremal_instance,
    row_entropy_bounds,
    row_logit_norm_bounds,
    theorem_bound,
)

TOL_REL = 1e-9


def logits_of(X, W_Q, W_K, scale=1.0, causal=False):
    """The attention logits in float64, with -inf above the diagonal when causal."""
    X, W_Q, W_K = (np.asarray(m, dtype=np.float64) for m in (X, W_Q, W_K))
    a = scale * (X @ W_Q) @ (X @ W_K).T                   # (T, T)
    if causal:
        a = np.where(np.tril(np.ones(a.shape, dtype=bool)), a, -np.inf)
    return a


def random_instance(seed, T, d, n, heads, dtype, magnitude):
    """Tokens (T, d) with a shared mean direction (as in trained models) and `heads` maps."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((T, d)) + rng.standard_normal(d)   # (T, d), non-zero mean token
    X *= magnitude / max(np.linalg.norm(X, 2), 1e-300) ** 0.5 if magnitude else 0.0
    W_Q = rng.standard_normal((heads, d, n)) / np.sqrt(d)      # (H, d, n)
    W_K = rng.standard_normal((heads, d, n)) / np.sqrt(d)
    return X.astype(dtype), W_Q.astype(dtype), W_K.astype(dtype)


instances = st.tuples(
    st.integers(0, 2**32 - 1),          # seed
    st.integers(1, 128),                # T
    st.integers(1, 64),                 # d
    st.integers(1, 16),                 # n (head dim)
    st.integers(1, 3),                  # heads
    st.sampled_from([np.float32, np.float64]),
    st.floats(0, 6),                    # ~ sqrt of the logit scale before W
    st.sampled_from([1.0, 0.125, 0.5, 2.0]),  # scale, e.g. 1/sqrt(n)
    st.booleans(),                      # causal
)


@given(instances)
@example((0, 1, 1, 1, 1, np.float64, 1.0, 1.0, False))      # T = 1: a single key
@example((1, 2, 1, 1, 1, np.float64, 3.0, 1.0, True))       # T = 2, causal
@example((2, 128, 64, 16, 3, np.float32, 6.0, 2.0, True))   # largest, float32
@example((3, 64, 8, 4, 2, np.float64, 0.0, 1.0, False))     # X = 0: every bound is log T
def test_every_variant_is_a_valid_ordered_lower_bound(inst):
    """Ent(A_i) >= exact >= centered >= per_query >= theorem (eq. (7)) for every head and row,
    causal or not; the non-causal "theorem" row is theorem_bound's value (eq. (1))."""
    seed, T, d, n, heads, dtype, magnitude, scale, causal = inst
    X, W_Q, W_K = random_instance(seed, T, d, n, heads, dtype, magnitude)
    for h in range(heads):
        ent = softmax_entropy(logits_of(X, W_Q[h], W_K[h], scale, causal))      # (T,)
        bounds = row_entropy_bounds(X, W_Q[h], W_K[h], scale=scale, causal=causal)
        assert set(bounds) == set(VARIANTS)
        for name in VARIANTS:
            assert bounds[name].shape == (T,) and bounds[name].dtype == np.float64
            assert np.all(ent >= bounds[name] * (1 - TOL_REL)), name
        for weak, strong in zip(VARIANTS, VARIANTS[1:]):
            assert np.all(bounds[weak] <= bounds[strong] * (1 + TOL_REL)), (weak, strong)
        if not causal:
            tb = theorem_bound(X, W_Q[h], W_K[h], scale=scale)
            np.testing.assert_allclose(bounds["theorem"], tb.value, rtol=1e-13, atol=0)
            assert np.all(ent >= tb.value * (1 - TOL_REL))


@given(instances)
@example((4, 128, 64, 16, 1, np.float64, 6.0, 2.0, True))
def test_logit_norm_chain(inst):
    """eq. (3)-(4): ||a_i - mean(a_i)|| <= ||a_i|| <= sigma ||x_i|| ||X|| <= sigma sigma_x; the
    "exact" variant is the centred norm of the row itself (over the visible keys)."""
    seed, T, d, n, _, dtype, magnitude, scale, causal = inst
    X, W_Q, W_K = random_instance(seed, T, d, n, 1, dtype, magnitude)
    W_Q, W_K = W_Q[0], W_K[0]
    # reference logits in extended precision (x87 long double: 64-bit mantissa where available)
    Xl, Ql, Kl = (np.asarray(m, dtype=np.longdouble) for m in (X, W_Q, W_K))
    a = np.longdouble(scale) * (Xl @ Ql) @ (Xl @ Kl).T
    s = row_logit_norm_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    tb = theorem_bound(X, W_Q, W_K, scale=scale)
    # the rounding margin of the exact variant: relative (T + 2) eps, absolute ~(2d + n) eps
    # times |x_i| |W_Q|_F |W_K|_F |X|_F |scale| (module docstring of theory.instances)
    X64, Q64, K64 = (np.asarray(m, dtype=np.float64) for m in (X, W_Q, W_K))
    slack = 1e-12 * abs(scale) * np.linalg.norm(Q64) * np.linalg.norm(K64) * np.linalg.norm(X64)
    for i in range(T):
        row = a[i, : i + 1] if causal else a[i]
        centred = float(np.sqrt(np.sum((row - row.mean()) ** 2)))
        assert centred <= s["exact"][i]                       # an upper bound, rounded up
        assert s["exact"][i] <= centred * (1 + 1e-12) + slack * np.linalg.norm(X64[i])
        assert centred <= float(np.sqrt(np.sum(row**2))) * (1 + 1e-15) + 1e-300
        assert float(np.sqrt(np.sum(row**2))) <= tb.logit_norm
    np.testing.assert_array_equal(s["theorem"], tb.logit_norm)


@given(st.floats(0, 40), st.integers(1, 128), st.integers(0, 16), st.data(),
       st.floats(0.1, 3))
@example(0.0, 1, 0, None, 1.0)
@example(0.0, 2, 0, None, 1.0)
@example(40.0, 2, 0, None, 1.0)
@example(40.0, 128, 16, None, 0.1)
@example(1e-9, 128, 0, None, 3.0)
def test_extremal_instance_attains_the_theorem(sigma, T, extra_dim, data, token_norm):
    """Tightness (eq. (5)): row `row` of the construction has entropy h_T(sigma c^2) =
    theorem_bound to 1e-12 relative (both from the same float64 logits of size <= ~40 * 9,
    rounding amplified by at most g), and all four variants coincide there."""
    row = data.draw(st.integers(0, T - 1)) if data is not None else T - 1
    X, W_Q, W_K = extremal_instance(sigma, T, T + extra_dim, row=row, token_norm=token_norm)
    assert X.shape == (T, T + extra_dim) and W_Q.shape == W_K.shape == (T + extra_dim, 1)
    tb = theorem_bound(X, W_Q, W_K)
    assert tb.sigma == pytest.approx(sigma, rel=1e-14, abs=1e-300)
    assert tb.sigma_x == pytest.approx(token_norm**2, rel=1e-14)
    # the bounds are rounded outward: below the measured entropy, by <= 1e-12 (1 + g) relative
    rel = 1e-12 * (1 + sigma * token_norm**2 * np.sqrt(T / max(T - 1, 1)))
    assert tb.value == pytest.approx(entropy_lower_bound(sigma * token_norm**2, T), rel=rel, abs=1e-300)
    ent = softmax_entropy(logits_of(X, W_Q, W_K))
    assert tb.value <= ent[row]
    assert ent[row] == pytest.approx(tb.value, rel=rel, abs=1e-300)
    bounds = row_entropy_bounds(X, W_Q, W_K)
    for name in VARIANTS:
        assert bounds[name][row] <= ent[row], name
        assert bounds[name][row] == pytest.approx(tb.value, rel=rel, abs=1e-300), name


def test_the_gap_between_variants_is_real():
    """For tokens with a large shared mean (typical of trained models) the theorem's value is
    near 0 while the centred and exact variants stay informative (the point of eq. (7))."""
    rng = np.random.default_rng(0)
    T, d = 64, 32
    X = 0.3 * rng.standard_normal((T, d)) + 1.0 * rng.standard_normal(d)   # (T, d)
    W_Q, W_K = rng.standard_normal((d, 8)) / 8, rng.standard_normal((d, 8)) / 8
    b = row_entropy_bounds(X, W_Q, W_K, scale=8**-0.5)
    assert b["theorem"].max() < 1e-100                 # the paper's number says nothing here
    assert b["per_query"].max() < 1e-10
    assert np.median(b["centered"]) > 1.0              # centring removes the shared mean
    assert np.median(b["exact"]) > 0.9 * np.log(T)     # and the rows are in fact near uniform
    assert np.all(b["exact"] >= b["centered"])


def test_scale_enters_as_its_absolute_value():
    rng = np.random.default_rng(1)
    X, W_Q, W_K = rng.standard_normal((5, 4)), rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    pos, neg = theorem_bound(X, W_Q, W_K, scale=0.5), theorem_bound(X, W_Q, W_K, scale=-0.5)
    assert pos == neg
    assert pos.sigma == pytest.approx(0.5 * np.linalg.norm(W_K @ W_Q.T, 2))
    ent = softmax_entropy(logits_of(X, W_Q, W_K, -0.5))
    assert np.all(ent >= row_entropy_bounds(X, W_Q, W_K, scale=-0.5)["exact"] * (1 - TOL_REL))


def test_causal_first_row_has_zero_bound_and_one_key():
    rng = np.random.default_rng(2)
    X, W_Q, W_K = rng.standard_normal((6, 3)), rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    b = row_entropy_bounds(X, W_Q, W_K, causal=True)
    for name in VARIANTS:
        assert b[name][0] == 0.0
        assert np.all(b[name][1:] <= np.log(np.arange(2, 7)) * (1 + 1e-15))


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("X, W_Q, W_K, match", [
    (np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), "W_Q"),
    (np.ones((3, 2)), np.ones((2, 2)), np.ones((2, 3)), "W_K"),
    (np.ones(3), np.ones((3, 2)), np.ones((3, 2)), "X"),
    (np.full((3, 2), np.nan), np.ones((2, 2)), np.ones((2, 2)), "X"),
    (np.ones((3, 2)), np.ones((2, 2)), np.full((2, 2), np.inf), "W_K"),
    (np.ones((0, 2)), np.ones((2, 2)), np.ones((2, 2)), "X"),
])
def test_instance_functions_reject_bad_shapes_and_values(X, W_Q, W_K, match):
    for fn in (theorem_bound, row_logit_norm_bounds, row_entropy_bounds):
        with pytest.raises(ValueError, match=match):
            fn(X, W_Q, W_K)


def test_bad_scale_and_causal():
    X, W = np.ones((3, 2)), np.ones((2, 2))
    with pytest.raises(ValueError, match="scale"):
        theorem_bound(X, W, W, scale=np.inf)
    with pytest.raises(TypeError, match="scale"):
        row_entropy_bounds(X, W, W, scale=[1.0])
    with pytest.raises(TypeError, match="causal"):
        row_entropy_bounds(X, W, W, causal="yes")


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=1.0, seq_len=4, dim=1), "dim"),
    (dict(sigma=1.0, seq_len=2, dim=1), "dim"),
    (dict(sigma=1.0, seq_len=1, dim=0), "dim"),
    (dict(sigma=1.0, seq_len=4, dim=3, construction="orthogonal"), "dim"),
    (dict(sigma=1.0, seq_len=4, construction="diagonal"), "construction"),
    (dict(sigma=1.0, seq_len=4, construction=None), "construction"),
    (dict(sigma=-1.0, seq_len=4), "sigma"),
    (dict(sigma=1.0, seq_len=0), "seq_len"),
    (dict(sigma=1.0, seq_len=4, row=4), "row"),
    (dict(sigma=1.0, seq_len=4, token_norm=np.nan), "token_norm"),
])
def test_extremal_instance_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extremal_instance(**kwargs)


# ------------------------------------------------- tightness in two dimensions (README)
def _row_logits(X, W_Q, W_K, row):
    """Row `row` of the logits only (T keys; the full T x T matrix is not formed)."""
    return (X[row] @ W_Q) @ (X @ W_K).T


@given(st.floats(0, 40), st.integers(2, 10**4), st.integers(2, 6), st.data(),
       st.floats(0.1, 2.5))
@example(0.0, 2, 2, None, 1.0)
@example(40.0, 2, 2, None, 2.5)
@example(1e-9, 10**4, 2, None, 0.1)
@example(25.0, 10**4, 2, None, 2.5)
@example(3.0, 10**4, 3, None, 1.0)
@example(7.0, 3, 2, None, 1.7)
def test_planar_instance_attains_the_bound(sigma, T, dim, data, token_norm):
    """README "Tightness": with d = 2 (token i = c e1, the others c e2/sqrt(T-1), rank-one
    maps) row i has entropy h_T(sigma c^2) to 1e-12 relative, checked against 50-digit mpmath,
    for T up to 10^4; X^T X = c^2 I, ||x_i|| = ||X||_2 = c, ||W_K W_Q^T||_2 = sigma."""
    from theory.certify import entropy_lower_bound_mp
    row = data.draw(st.integers(0, T - 1)) if data is not None else T - 1
    X, W_Q, W_K = extremal_instance(sigma, T, dim, row=row, token_norm=token_norm,
                                    construction="planar")
    assert X.shape == (T, dim) and W_Q.shape == W_K.shape == (dim, 1)
    assert np.count_nonzero(X[:, 2:]) == 0            # only two coordinates are used
    c2 = token_norm**2
    np.testing.assert_allclose(X.T @ X, c2 * np.eye(dim)[:, :2] @ np.eye(dim)[:2], atol=1e-14 * c2)
    assert np.linalg.norm(X[row]) ** 2 == pytest.approx(c2, rel=1e-15)
    ent = softmax_entropy(_row_logits(X, W_Q, W_K, row))
    s = sigma * c2
    ref = float(entropy_lower_bound_mp(s, T))
    assert ent == pytest.approx(ref, rel=1e-12, abs=1e-300)
    assert entropy_lower_bound(s, T) == pytest.approx(ref, rel=1e-12, abs=1e-300)
    tb = theorem_bound(X, W_Q, W_K)
    assert tb.sigma == pytest.approx(sigma, rel=1e-14, abs=1e-300)
    assert tb.sigma_x == pytest.approx(c2, rel=1e-14)
    # theorem_bound rounds outward (its s up by ~4 T eps, README): never above the entropy
    assert tb.logit_norm == pytest.approx(s, rel=1e-10, abs=1e-300) and tb.value <= ent


@pytest.mark.parametrize("T", [2, 3, 10, 1000])
def test_dim_below_seq_len_uses_the_planar_construction(T):
    """construction="auto": orthogonal (the earlier instances, unchanged) when d >= T, planar
    otherwise; both attain h_T, and an explicit choice is honoured."""
    X, W_Q, W_K = extremal_instance(2.0, T, max(T - 1, 2), row=T - 1, token_norm=1.3)
    assert np.count_nonzero(X[:, 2:]) == 0
    Xo, _, _ = extremal_instance(2.0, T, T + 1, row=T - 1, token_norm=1.3)
    np.testing.assert_array_equal(Xo, 1.3 * np.eye(T, T + 1))
    Xp, W_Qp, W_Kp = extremal_instance(2.0, T, T + 1, row=T - 1, token_norm=1.3,
                                       construction="planar")
    assert np.count_nonzero(Xp[:, 2:]) == 0
    h = entropy_lower_bound(2.0 * 1.3**2, T)
    for inst in ((X, W_Q, W_K), (Xp, W_Qp, W_Kp), extremal_instance(2.0, T, T + 1, row=T - 1,
                                                                    token_norm=1.3)):
        assert softmax_entropy(_row_logits(*inst, T - 1)) == pytest.approx(h, rel=1e-12)


def _rho(T):
    """The sharp d = 1 constant: max |x_i| ||x - mean(x)|| / ||x||^2 = (1 + sqrt(1 - 1/T))/2."""
    return (1 + np.sqrt(1 - 1 / T)) / 2


@given(st.integers(2, 64), st.integers(0, 2**32 - 1), st.floats(0.01, 20))
@example(2, 0, 20.0)
@example(64, 1, 0.01)
def test_one_dimension_never_attains_the_bound(T, seed, w):
    """README "Tightness": with d = 1 every row has centred logit norm <= rho_T sigma sigma_x,
    rho_T = (1 + sqrt(1 - 1/T))/2 < 1, so its entropy is >= h_T(rho_T 𝛔) > h_T(𝛔) = the
    theorem's value whenever 𝛔 > 0 (checked on random x and weights of either sign)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, 1)) * rng.choice([0.01, 1.0, 30.0])
    x[rng.integers(T)] *= rng.choice([1.0, 100.0])              # sometimes one dominant token
    W_Q, W_K = np.array([[w]]), np.array([[rng.choice([-1.0, 1.0])]])
    tb = theorem_bound(x, W_Q, W_K)
    logits = logits_of(x, W_Q, W_K)
    centred = np.linalg.norm(logits - logits.mean(axis=1, keepdims=True), axis=1)
    assert np.all(centred <= _rho(T) * tb.logit_norm * (1 + 1e-12))
    sharper = entropy_lower_bound(_rho(T) * tb.logit_norm, T)
    ent = softmax_entropy(logits)
    assert np.all(ent >= sharper * (1 - 1e-9))
    if tb.logit_norm > 1e-3 and tb.value > 0:                  # (both may underflow to 0)
        assert sharper > tb.value                                # so equality is impossible


@pytest.mark.parametrize("T", [2, 3, 7, 100])
def test_the_one_dimensional_constant_is_sharp(T):
    """x_i = cos t*, the other T-1 entries -sin t*/sqrt(T-1), 2t* = pi/2 - arctan(sqrt(T-1)):
    row i's centred norm is rho_T 𝛔 and, being one-high, its entropy is h_T(rho_T 𝛔)."""
    t = (np.pi / 2 - np.arctan(np.sqrt(T - 1))) / 2
    x = np.full((T, 1), -np.sin(t) / np.sqrt(T - 1))
    x[0, 0] = np.cos(t)
    W_Q, W_K = np.array([[3.0]]), np.array([[1.0]])
    tb = theorem_bound(x, W_Q, W_K)
    row = logits_of(x, W_Q, W_K)[0]
    assert np.linalg.norm(row - row.mean()) == pytest.approx(_rho(T) * tb.logit_norm, rel=1e-12)
    assert softmax_entropy(row) == pytest.approx(
        entropy_lower_bound(_rho(T) * tb.logit_norm, T), rel=1e-12)


# ----------------------------------------------------------------- issue 13: edges
small_instances = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(1, 12), st.integers(1, 6),
    st.just(1), st.just(np.float64), st.floats(0.5, 6), st.sampled_from([1.0, 0.125, -2.0]),
    st.booleans())


@given(small_instances, st.integers(-500, 500), st.integers(-800, 800), st.integers(-800, 800))
@example((5, 16, 8, 4, 1, np.float64, 2.0, 0.5, True), -500, 800, 200)
@example((6, 16, 8, 4, 1, np.float64, 2.0, 0.5, False), 500, -800, -200)
@example((7, 3, 2, 2, 1, np.float64, 2.0, 1.0, False), -500, 800, 800)
def test_bounds_are_exactly_invariant_to_powers_of_two(inst, kx, kq, kk):
    """Issue 13, 1: X 2^kx, W_Q 2^kq, W_K 2^kk with scale 2^-(2kx+kq+kk) is the same attention
    (same logits), and the bounds are computed from scaled matrices, so they are *identical*,
    whatever the magnitudes (1e-150 .. 1e240 here: W_K W_Q^T, ||X||^2 and their product
    leave the float64 range)."""
    assume(abs(2 * kx + kq + kk) <= 1000)             # the scale itself stays a normal float
    seed, T, d, n, _, _, magnitude, scale, causal = inst
    X, W_Q, W_K = random_instance(seed, T, d, n, 1, np.float64, magnitude)
    W_Q, W_K = W_Q[0], W_K[0]
    ref = row_entropy_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    ref_s = row_logit_norm_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    args = (np.ldexp(X, kx), np.ldexp(W_Q, kq), np.ldexp(W_K, kk))
    sc = float(np.ldexp(scale, -(2 * kx + kq + kk)))
    with np.errstate(all="raise"):
        got = row_entropy_bounds(*args, scale=sc, causal=causal)
        got_s = row_logit_norm_bounds(*args, scale=sc, causal=causal)
        tb = theorem_bound(*args, scale=sc, causal=causal)
    for name in VARIANTS:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
        np.testing.assert_array_equal(got_s[name], ref_s[name], err_msg=name)
    np.testing.assert_array_equal(tb.value, ref["theorem"])


def test_extreme_magnitudes_give_finite_correct_bounds():
    """Issue 13, 1: tiny tokens and huge weights (logits of order 1), huge tokens and zero
    weights (logits 0: log T), and logits near 1e300 with finite values."""
    with np.errstate(all="raise"):
        tb = theorem_bound(np.eye(3) * 1e-160, np.eye(3) * 1e160, np.eye(3) * 1e160)
        assert tb.logit_norm == pytest.approx(1.0, rel=1e-13)
        assert tb.value == pytest.approx(entropy_lower_bound(1.0, 3), rel=1e-13)
        assert tb.value <= entropy_lower_bound(1.0, 3)
        tb = theorem_bound(np.eye(4) * 1e200, np.zeros((4, 2)), np.zeros((4, 2)))
        assert tb.logit_norm == 0.0 and tb.value == pytest.approx(np.log(4), rel=1e-14)
        assert tb.value <= softmax_entropy(np.zeros(4))
        X = np.array([[1e200, 0.0], [0.0, 1e200]])
        W_Q, W_K = np.eye(2) * 1e200, np.eye(2) * 1e-300            # logits 1e300, finite
        b = row_entropy_bounds(X, W_Q, W_K)
        s = row_logit_norm_bounds(X, W_Q, W_K)
    logits = (X @ (W_Q * 1e-100)) @ (X @ (W_K * 1e100)).T          # (1e300, 0; 0, 1e300)
    assert np.isfinite(logits).all()
    assert np.all(s["exact"] >= 1e300 * np.sqrt(0.5))              # ||(1e300, 0) - mean||
    assert s["exact"][0] == pytest.approx(1e300 * np.sqrt(0.5), rel=1e-12)
    with np.errstate(all="raise"):
        for name in VARIANTS:
            assert np.all(np.isfinite(b[name])) and np.all(b[name] == 0.0)
        assert theorem_bound(X, W_Q, W_K).logit_norm == pytest.approx(1e300, rel=1e-13)
        assert theorem_bound(X * 1e10, W_Q, W_K).logit_norm == np.inf    # 1e320: beyond float64
        assert theorem_bound(X * 1e10, W_Q, W_K).value == 0.0


@given(st.floats(0, 500), st.integers(1, 256), st.integers(0, 8), st.data(),
       st.floats(0.05, 4))
@example(0.0, 1, 0, None, 1.0)
@example(500.0, 256, 8, None, 0.05)
@example(1e-7, 256, 0, None, 4.0)
@example(120.0, 3, 0, None, 2.0)
@example(715.0450669341373, 87, 0, None, 1.0)   # e^-g subnormal, h normal
@example(706.0, 87, 0, None, 1.0)               # just below that band
def test_outward_rounding_on_extremal_instances(sigma, T, extra_dim, data, token_norm):
    """Issue 13, 2: on the instances that attain the bound, no variant ever exceeds the entropy
    softmax_entropy measures for the row (no tolerance), the order of eq. (7) holds exactly,
    and the outward rounding costs at most 1e-12 (1 + g) relative."""
    row = data.draw(st.integers(0, T - 1)) if data is not None else T - 1
    X, W_Q, W_K = extremal_instance(sigma, T, T + extra_dim, row=row, token_norm=token_norm)
    ent = softmax_entropy(logits_of(X, W_Q, W_K))
    b = row_entropy_bounds(X, W_Q, W_K)
    s = row_logit_norm_bounds(X, W_Q, W_K)
    tb = theorem_bound(X, W_Q, W_K)
    assert np.all(ent >= tb.value)
    for name in VARIANTS:
        assert np.all(ent >= b[name]), name
    for weak, strong in zip(VARIANTS, VARIANTS[1:]):
        assert np.all(b[weak] <= b[strong]) and np.all(s[weak] >= s[strong]), (weak, strong)
    g = sigma * token_norm**2 * np.sqrt(T / max(T - 1, 1))
    if g <= -np.log(np.finfo(float).tiny):    # beyond, e^-g is subnormal and the bound is 0
        assert b["exact"][row] >= ent[row] * (1 - 1e-12 * (1 + g))
    else:
        assert b["exact"][row] == 0.0


def _independent_s(X, W_Q, W_K, scale, causal):
    """per_query and centered from eigenvalues (eigvalsh of Gram matrices), not from the SVDs
    and not from the code under test: sigma^2 = lambda_max(W_Q W_K^T W_K W_Q^T) and so on."""
    T = X.shape[0]
    lam = lambda m: float(np.sqrt(max(np.linalg.eigvalsh(m)[-1], 0.0)))  # noqa: E731
    sigma = abs(scale) * lam(W_Q @ (W_K.T @ W_K) @ W_Q.T)
    per_query, centered = np.empty(T), np.empty(T)
    for i in range(T):
        Xi = X[: i + 1] if causal else X
        P = np.eye(len(Xi)) - 1.0 / len(Xi)
        xi = float(np.sqrt(X[i] @ X[i]))
        per_query[i] = sigma * xi * lam(Xi.T @ Xi)
        centered[i] = sigma * xi * lam(Xi.T @ P @ Xi)
    return per_query, centered


@given(st.integers(0, 2**32 - 1), st.integers(2, 24), st.integers(1, 8), st.integers(1, 4),
       st.sampled_from([1.0, 0.25, -0.5]), st.booleans())
@example(0, 24, 8, 4, 1.0, True)
@example(1, 2, 1, 1, 0.25, True)
def test_per_query_and_centered_match_an_independent_computation(seed, T, d, n, scale, causal):
    """The causal (and full) per_query / centered logit-norm bounds are sigma ||x_i|| ||X_i||_2
    and sigma ||x_i|| ||P X_i||_2 with X_i the *visible* keys: replacing ||X_i|| by ||X||
    (valid, weaker) or the centring of X_i by that of X changes them by O(1) and fails here.
    Tolerance 1e-9 relative: eigvalsh of a Gram matrix gives its top eigenvalue to ~T eps
    relative (the square root halves it)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((T, d)) + 2.0 * rng.standard_normal(d)   # shared mean direction
    W_Q, W_K = rng.standard_normal((d, n)), rng.standard_normal((d, n))
    s = row_logit_norm_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    per_query, centered = _independent_s(X, W_Q, W_K, scale, causal)
    np.testing.assert_allclose(s["per_query"], np.minimum(per_query, s["theorem"]), rtol=1e-9)
    centered_ref = np.minimum(centered, per_query)
    np.testing.assert_allclose(s["centered"], centered_ref, rtol=1e-9,
                               atol=1e-12 * float(np.max(per_query)))


def test_theorem_bound_causal_is_per_row():
    """Issue 13, 3: theorem_bound's single value is for unmasked rows; under a causal mask
    row 0 has entropy 0 < value, so causal=True gives h_{i+1}(sigma sigma_x) per row, which
    every causal row respects, and its last row (T keys) is the unmasked value."""
    rng = np.random.default_rng(3)
    X, W_Q, W_K = rng.standard_normal((7, 3)), rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    scale = 0.3
    full = theorem_bound(X, W_Q, W_K, scale=scale)
    causal = theorem_bound(X, W_Q, W_K, scale=scale, causal=True)
    ent = softmax_entropy(logits_of(X, W_Q, W_K, scale, causal=True))
    assert ent[0] == 0.0 < full.value                 # the unmasked statement fails on row 0
    assert causal.value.shape == (7,) and causal.value[0] == 0.0
    assert np.all(ent >= causal.value)
    assert causal.value[-1] == full.value
    expected = entropy_lower_bound(causal.logit_norm, np.arange(1, 8))
    np.testing.assert_allclose(causal.value, expected, rtol=1e-13)
    assert np.all(causal.value <= expected)
    np.testing.assert_array_equal(causal.value,
                                  row_entropy_bounds(X, W_Q, W_K, scale=scale, causal=True)["theorem"])
    with pytest.raises(TypeError, match="causal"):
        theorem_bound(X, W_Q, W_K, causal=1)


@given(st.integers(0, 2**32 - 1), st.integers(3, 48), st.floats(0.5, 60), st.floats(0, 1e-3))
@example(0, 48, 60.0, 0.0)
@example(1, 3, 0.5, 1e-3)
def test_near_extremal_causal_rows_beyond_two_keys(seed, T, sigma, noise):
    """Near-extremal instances under a causal mask: the extremal row is the last one (it sees
    all T >= 3 keys), perturbed by relative noise; every row respects every variant exactly."""
    X, W_Q, W_K = extremal_instance(sigma, T, row=T - 1)
    rng = np.random.default_rng(seed)
    X = X + noise * rng.standard_normal(X.shape)
    W_K = W_K * (1 + noise * rng.standard_normal(W_K.shape))
    ent = softmax_entropy(logits_of(X, W_Q, W_K, causal=True))
    b = row_entropy_bounds(X, W_Q, W_K, causal=True)
    for name in VARIANTS:
        assert np.all(ent >= b[name]), name
    if noise == 0:
        assert b["exact"][-1] == pytest.approx(ent[-1], rel=1e-12 * (1 + 2 * sigma), abs=0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scale="2"), TypeError, "scale"),
    (dict(scale=b"2"), TypeError, "scale"),
    (dict(scale=True), TypeError, "scale"),
    (dict(scale=10**400), ValueError, "scale"),
    (dict(causal="yes"), TypeError, "causal"),
])
def test_instance_functions_reject_strings_and_huge_ints(kwargs, exc, match):
    X, W = np.ones((3, 2)), np.ones((2, 2))
    fns = (theorem_bound, row_logit_norm_bounds, row_entropy_bounds)
    for fn in fns:
        with pytest.raises(exc, match=match):
            fn(X, W, W, **kwargs)
    with pytest.raises(TypeError, match="X"):
        theorem_bound("abc", W, W)
    # ||W W^T||_2 = 4, ||X||_2^2 = 6: a Python int beyond int64 is taken as its float
    assert theorem_bound(X, W, W, scale=10**20).logit_norm == pytest.approx(1e20 * 4 * 6)


def _mp_spectral(rows):
    """||M||_2 of a list-of-lists of mpf, at the current mpmath precision (singular values)."""
    import mpmath
    return max(mpmath.svd_r(mpmath.matrix(rows), compute_uv=False))


@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.integers(1, 3),
       st.integers(0, 13), st.integers(0, 13), st.booleans())
@example(0, 6, 3, 12, 0, True)
@example(1, 6, 3, 0, 12, False)
@example(2, 5, 2, 10, 10, True)
def test_each_norm_bound_is_rounded_up_from_its_exact_value_under_cancellation(
        seed, T, d, k_tokens, k_weights, causal):
    """Issue 13, 2: each variant's s_i is >= the exact value of its own formula for the float64
    instance, computed here in 60-digit mpmath from the exact binary inputs, also when the
    float64 evaluation cancels: tokens equal up to 10^-k_tokens (the centring P X_i and the
    centred logit row cancel) and W_Q = W_K (e_1 e_1^T - e_1 e_2^T ...) up to 10^-k_weights
    (W_K W_Q^T cancels). A bound computed without the absolute rounding terms falls below."""
    import mpmath
    rng = np.random.default_rng(seed)
    X = rng.standard_normal(d) + 10.0 ** -k_tokens * rng.standard_normal((T, d))
    W_K = rng.standard_normal((d, 2))
    W_Q = np.stack([W_K[:, 0], -W_K[:, 0]], axis=1) + 10.0 ** -k_weights * rng.standard_normal((d, 2))
    W_Q[:, 1] = -W_Q[:, 0] + 10.0 ** -k_weights * rng.standard_normal(d)
    W_K[:, 1] = W_K[:, 0]                  # W_K W_Q^T = k (q_0 + q_1)^T, q_0 + q_1 ~ 10^-k
    s = row_logit_norm_bounds(X, W_Q, W_K, causal=causal)
    with mpmath.workdps(60):
        mp = lambda a: [[mpmath.mpf(float(v)) for v in r] for r in np.atleast_2d(a)]  # noqa: E731
        Xm, Qm, Km = mpmath.matrix(mp(X)), mpmath.matrix(mp(W_Q)), mpmath.matrix(mp(W_K))
        M = Km * Qm.T
        sigma = _mp_spectral(M.tolist())
        sigma_x = _mp_spectral(Xm.tolist()) ** 2
        logits = (Xm * Qm) * (Xm * Km).T
        assert s["theorem"][0] >= sigma * sigma_x
        for i in range(T):
            Ti = i + 1 if causal else T
            keys = [Xm[j, :] for j in range(Ti)]
            mean = [mpmath.fsum(kj[c] for kj in keys) / Ti for c in range(d)]
            xi = mpmath.sqrt(mpmath.fsum(Xm[i, c] ** 2 for c in range(d)))
            prefix = _mp_spectral([[kj[c] for c in range(d)] for kj in keys])
            prefix_c = _mp_spectral([[kj[c] - mean[c] for c in range(d)] for kj in keys])
            row = [logits[i, j] for j in range(Ti)]
            rbar = mpmath.fsum(row) / Ti
            centred = mpmath.sqrt(mpmath.fsum((r - rbar) ** 2 for r in row))
            assert s["per_query"][i] >= sigma * xi * prefix, i
            assert s["centered"][i] >= sigma * xi * prefix_c, i
            assert s["exact"][i] >= centred, (i, float(centred), s["exact"][i])


def test_entropy_order_is_exact_where_float_h_is_not_monotone(monkeypatch):
    """float64 h is not monotone at the last ulp: h(s) < h(nextafter(s)) for ~0.3% of s at
    T = 2, e.g. s = 1.3112702645341956 (even after rounding down). Where two variants' s differ
    by that ulp (typical on extremal instances, where they coincide exactly), the entropy
    bounds must still be ordered: row_entropy_bounds takes the running maximum."""
    import theory.instances as inst
    s1 = 1.3112702645341956
    s2 = float(np.nextafter(s1, np.inf))
    pre = inst._entropy_bounds_down(np.array([s2, s1]), np.array([2.0, 2.0]))
    assert pre[0] > pre[1]                          # the inversion is real
    crafted = {"theorem": np.array([s2, s2]), "per_query": np.array([s1, s1]),
               "centered": np.array([s1, s1]), "exact": np.array([s1, s1])}
    monkeypatch.setattr(inst, "row_logit_norm_bounds", lambda *a, **k: dict(crafted))
    b = inst.row_entropy_bounds(np.ones((2, 1)), np.ones((1, 1)), np.ones((1, 1)))
    for weak, strong in zip(VARIANTS, VARIANTS[1:]):
        assert np.all(b[weak] <= b[strong]), (weak, strong)


@pytest.mark.parametrize("g", [700.0, 720.0, 740.0, 745.0])
def test_subnormal_bounds_are_flushed_to_zero(g):
    """Below the smallest normal float64 h loses digits to gradual underflow, so a rounded-down
    bound is not guaranteed there: the instance bounds return 0 instead (documented)."""
    X, W_Q, W_K = extremal_instance(g / np.sqrt(2.0), 2)
    b = row_entropy_bounds(X, W_Q, W_K)
    for name in VARIANTS:
        v = b[name][0]
        assert v == 0.0 or v >= np.finfo(float).tiny, (name, v)
    assert 0.0 < entropy_lower_bound(g / np.sqrt(2.0), 2) < np.finfo(float).tiny or g == 700.0
