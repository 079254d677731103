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
from hypothesis import example, given
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
    assert tb.value == pytest.approx(entropy_lower_bound(sigma * token_norm**2, T), rel=rel)
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
    (dict(sigma=1.0, seq_len=4, dim=3), "dim"),
    (dict(sigma=-1.0, seq_len=4), "sigma"),
    (dict(sigma=1.0, seq_len=0), "seq_len"),
    (dict(sigma=1.0, seq_len=4, row=4), "row"),
    (dict(sigma=1.0, seq_len=4, token_norm=np.nan), "token_norm"),
])
def test_extremal_instance_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extremal_instance(**kwargs)
