"""Numerical certification: the global minimum on the sphere is h_T(s), the box pitfall is real."""
from __future__ import annotations

import itertools
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from theory.bound import entropy_lower_bound, extremal_logits, softmax_entropy
from theory.certify import (
    box_min_entropy,
    box_min_entropy_search,
    entropy_lower_bound_mp,
    minimize_entropy,
    one_hot_counterexample,
)

GRID_T = [2, 3, 5, 16, 64]
GRID_S = [0.1, 0.5, 1.0, 3.0, 8.0]


# ---------------------------------------------------------------- entropy_lower_bound_mp
@given(s=st.floats(0, 50), t=st.integers(1, 10**6))
@example(s=0.0, t=2).via("uniform row")
@example(s=1.0, t=1).via("one key")
def test_mp_matches_float_closed_form(s, t):
    ref = entropy_lower_bound_mp(s, t, dps=40)
    val = entropy_lower_bound(s, t)
    assert isinstance(ref, mpmath.mpf)
    assert abs(float(ref) - val) <= 1e-12 * max(float(ref), 1e-300)


def test_mp_matches_explicit_row_entropy_at_high_precision():
    """h_T(s) in mpmath equals the mpmath entropy of the explicit extremal row, eq. (5)."""
    with mpmath.workdps(60):
        for t, s in [(2, Fraction(1, 10)), (7, 3), (64, 8)]:
            g = mpmath.mpf(s.numerator) / s.denominator if isinstance(s, Fraction) else mpmath.mpf(s)
            g *= mpmath.sqrt(mpmath.mpf(t) / (t - 1))
            z = [g * (1 - mpmath.mpf(1) / t)] + [-g / t] * (t - 1)
            log_z = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in z))
            ent = -mpmath.fsum(mpmath.exp(x - log_z) * (x - log_z) for x in z)
            assert abs(ent - entropy_lower_bound_mp(s, t, dps=60)) < mpmath.mpf(10) ** -55


def test_mp_array_broadcasts_to_object_array():
    h = entropy_lower_bound_mp(np.array([0.5, 1.0, 2.0]), [[2], [8]], dps=30)
    assert h.shape == (2, 3) and h.dtype == object
    np.testing.assert_allclose(h.astype(float),
                               entropy_lower_bound([0.5, 1.0, 2.0], [[2], [8]]), rtol=1e-14)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(logit_norm=-1.0, seq_len=3), ValueError),
    (dict(logit_norm=1.0, seq_len=0), ValueError),
    (dict(logit_norm=1.0, seq_len=2.5), TypeError),
    (dict(logit_norm="abc", seq_len=3), TypeError),
    (dict(logit_norm=1.0, seq_len=3, dps=0), ValueError),
])
def test_mp_rejects_bad_input(kwargs, exc):
    with pytest.raises(exc):
        entropy_lower_bound_mp(**kwargs)


# ------------------------------------------------------------------------ minimize_entropy
def _check_minimum(s, t, restarts):
    r = minimize_entropy(s, t, restarts=restarts, seed=0)
    ref = float(entropy_lower_bound_mp(s, t))
    # the search reproduces h_T(s) (tight) and never goes below it (the bound holds)
    assert abs(r.value - ref) <= 1e-8
    assert r.start_values.min() >= ref - 1e-12
    assert abs(r.gap - (r.value - r.bound)) == 0.0
    # random starts alone (no adversarial help) also reach it
    assert r.start_values[:restarts].min() - ref <= 1e-8
    # the minimiser lies on the sphere in the centred plane and has the entropy reported
    assert abs(r.logits.sum()) < 1e-10
    assert np.linalg.norm(r.logits) == pytest.approx(s, rel=1e-12)
    assert softmax_entropy(r.logits) == pytest.approx(r.value, abs=1e-15)
    if s >= 1.0:  # away from the flat small-s regime the minimiser is the vertex z* of eq. (5)
        z_star = extremal_logits(s, t, top=int(np.argmax(r.logits)))
        np.testing.assert_allclose(r.logits, z_star, atol=1e-4)
    return r


@pytest.mark.parametrize("t, s", [(2, 1.0), (3, 0.1), (5, 3.0), (16, 0.5), (16, 8.0)])
def test_minimize_entropy_reproduces_bound(t, s):
    _check_minimum(s, t, restarts=6)


@pytest.mark.slow
@pytest.mark.parametrize("t, s", list(itertools.product(GRID_T, GRID_S)))
def test_minimize_entropy_grid(t, s):
    _check_minimum(s, t, restarts=16)


def test_minimize_entropy_zero_norm_is_uniform():
    r = minimize_entropy(0.0, 7)
    assert r.value == pytest.approx(np.log(7)) and abs(r.gap) < 1e-15


@pytest.mark.parametrize("kwargs, exc", [
    (dict(logit_norm=-0.1, seq_len=3), ValueError),
    (dict(logit_norm=np.inf, seq_len=3), ValueError),
    (dict(logit_norm=1.0, seq_len=1), ValueError),
    (dict(logit_norm=1.0, seq_len=3.0), TypeError),
    (dict(logit_norm=1.0, seq_len=3, restarts=0), ValueError),
    (dict(logit_norm="1", seq_len=3), TypeError),
])
def test_minimize_entropy_rejects_bad_input(kwargs, exc):
    with pytest.raises(exc):
        minimize_entropy(**kwargs)


# ----------------------------------------------------------------------------- the box
@pytest.mark.parametrize("t", [2, 3, 6, 10])
@pytest.mark.parametrize("b", [0.2, 1.0, 2.5])
def test_box_minimum_is_min_over_all_vertices(t, b):
    """Exhaustive: every one of the 2^T vertices has entropy >= the closed form, and the
    entropy of a vertex depends only on its number of high logits."""
    verts = np.array(list(itertools.product([-b, b], repeat=t)))
    ents = softmax_entropy(verts)
    r = box_min_entropy(b, t)
    assert ents.min() == pytest.approx(r.value, abs=1e-13)
    n_high = (verts > 0).sum(axis=1)
    np.testing.assert_allclose(ents, r.vertex_values[n_high], atol=1e-13)
    assert softmax_entropy(r.logits) == pytest.approx(r.value, abs=1e-13)


@pytest.mark.parametrize("t, b", [(4, 0.3), (10, 1.0), (10, 3.0), (25, 0.7), (40, 0.3)])
def test_box_minimum_matches_brute_force(t, b):
    found, z = box_min_entropy_search(b, t, restarts=64, seed=0)
    exact = box_min_entropy(b, t).value
    assert found >= exact - 1e-12          # nothing in the box beats the closed form
    assert found - exact <= 1e-8           # and the search finds it
    assert np.all(np.abs(z) <= b + 1e-12)


@given(b=st.floats(0.01, 10), t=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_random_box_rows_are_above_box_minimum(b, t, seed):
    z = np.random.default_rng(seed).uniform(-b, b, size=(64, t))
    assert softmax_entropy(z).min() >= box_min_entropy(b, t).value - 1e-12


def test_one_hot_counterexample_T10_s1():
    c = one_hot_counterexample(10, 1.0)
    assert c.is_counterexample
    assert c.naive == pytest.approx(1.8949, abs=5e-5)
    assert c.box.value == pytest.approx(1.8282, abs=5e-5)
    assert c.box.n_high == 2
    # the naive value is the entropy of the one-hot box row; the witness row really is in the box
    assert c.naive == pytest.approx(softmax_entropy(np.r_[1.0, -np.ones(9)]), abs=1e-14)
    assert np.all(np.abs(c.box.logits) <= 1.0)
    assert softmax_entropy(c.box.logits) < c.naive


def test_one_hot_wins_again_for_large_bound():
    for b in [2.0, 3.0, 5.0, 8.0]:
        c = one_hot_counterexample(10, b)
        assert c.box.n_high == 1 and not c.is_counterexample


def test_small_bound_minimiser_is_near_half():
    assert box_min_entropy(1e-3, 10).n_high == 5
    assert box_min_entropy(1e-3, 11).n_high in (5, 6)


# ----------------------------------------------------------------- issue 13: accuracy, edges
@pytest.mark.parametrize("s, t", [(30.0, 5), (40.0, 16), (25.0, 3), (60.0, 64), (12.0, 2)])
def test_minimize_entropy_is_accurate_in_relative_terms_where_h_is_tiny(s, t):
    """Issue 13, 4: at s = 30, T = 5, h = 3.7e-13; the search must reproduce it relatively
    (the old rescaled objective (H - log T) T/s^2 cancels and stopped at ~1e-9 absolute).
    Reference: 50-digit mpmath. 1e-12 relative: H and its gradient are evaluated without
    cancellation, so the rounding is a few ulp times g."""
    r = minimize_entropy(s, t, restarts=4, seed=0)
    ref = float(entropy_lower_bound_mp(s, t))
    assert ref < 1e-6
    assert abs(r.value - ref) <= 1e-12 * ref, (r.value, ref)
    assert r.start_values.min() >= ref * (1 - 1e-12)
    assert r.informative or t == 2


def test_agreement_proves_nothing_where_the_sphere_is_flat():
    """Issue 13, 4: as s -> 0 the entropy varies over the sphere only at O(s^3) (eq. (8));
    below ~(eps log T / |c3|)^(1/3) that is below rounding, and at T = 2 the sphere holds only
    the two extremal rows: the result says so (``informative`` False), and the spread it
    reports is the variation of an explicit row, checked here in mpmath."""
    assert minimize_entropy(1.0, 5, restarts=2).informative
    assert not minimize_entropy(1e-6, 5, restarts=2).informative
    assert not minimize_entropy(3.0, 2, restarts=2).informative
    r = minimize_entropy(0.5, 6, restarts=2)
    with mpmath.workdps(50):
        g = mpmath.mpf(0.5) * mpmath.sqrt(mpmath.mpf(6) / 5)
        # the balanced row: 3 entries +0.5/sqrt(6), 3 entries -0.5/sqrt(6) (norm 0.5)
        z = [mpmath.mpf(0.5) / mpmath.sqrt(6)] * 3 + [-mpmath.mpf(0.5) / mpmath.sqrt(6)] * 3
        lse = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in z))
        ent = -mpmath.fsum(mpmath.exp(x - lse) * (x - lse) for x in z)
        assert abs(float(ent - entropy_lower_bound_mp(0.5, 6)) - r.spread) < 1e-14
    del g


def test_box_rows_near_the_vertex_minimisers():
    """Rows just inside the box next to the minimising vertex (and next to every other vertex
    with k high logits) never go below the closed form of eq. (11); a row at the vertex meets
    it. Random box rows alone (uniform in the box) never come near those vertices."""
    rng = np.random.default_rng(0)
    for t, b in [(10, 1.0), (10, 1.3), (10, 1.35), (6, 0.2), (25, 0.7)]:
        r = box_min_entropy(b, t)
        for k in range(t + 1):
            vertex = np.where(np.arange(t) < k, b, -b)
            inward = -np.sign(vertex) * b * rng.uniform(0, 1e-3, (256, t))
            rows = vertex + inward
            ents = softmax_entropy(rows)
            assert ents.min() >= r.value - 1e-13, (t, b, k)
            assert softmax_entropy(vertex) == pytest.approx(r.vertex_values[k], abs=1e-13)
        assert softmax_entropy(r.logits) == pytest.approx(r.value, abs=1e-14)


def test_box_k_switch_at_T10():
    """At T = 10 the box minimiser has k = 2 high logits for small b and k = 1 from
    b* ~ 1.3141 on, where H_1 = H_2 in eq. (11). b* is found here independently: mpmath's
    root of the entropy difference of the two explicit rows (not the package's closed form),
    and the package must switch exactly there (and one_hot_counterexample with it)."""
    def ent(k, b):
        z = [b] * k + [-b] * (10 - k)
        lse = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in z))
        return -mpmath.fsum(mpmath.exp(x - lse) * (x - lse) for x in z)

    with mpmath.workdps(40):
        b_star = float(mpmath.findroot(lambda b: ent(1, b) - ent(2, b), 1.3))
    assert b_star == pytest.approx(1.31426, abs=1e-5)          # "b ~ 1.314"
    for delta in (1e-3, 1e-6):
        lo, hi = box_min_entropy(b_star - delta, 10), box_min_entropy(b_star + delta, 10)
        assert lo.n_high == 2 and hi.n_high == 1, delta
        assert one_hot_counterexample(10, b_star - delta).is_counterexample
        assert not one_hot_counterexample(10, b_star + delta).is_counterexample
        # exhaustive over all 2^10 vertices on both sides
        for b, k in ((b_star - delta, 2), (b_star + delta, 1)):
            verts = np.array(list(itertools.product([-b, b], repeat=10)))
            ents = softmax_entropy(verts)
            best = verts[np.argmin(ents)]
            assert int((best > 0).sum()) == k
            assert ents.min() == pytest.approx(box_min_entropy(b, 10).value, abs=1e-13)


def test_mp_inputs_exact_and_validated():
    """Issue 13, 6: Fractions are exact (strings rejected), seq_len beyond int64 is exact."""
    with mpmath.workdps(50):
        tenth = mpmath.mpf(1) / 10
        h = entropy_lower_bound_mp(Fraction(1, 10), 7, dps=50)
        assert h == entropy_lower_bound_mp(tenth, 7, dps=50)
        assert h != entropy_lower_bound_mp(0.1, 7, dps=50)       # the float 0.1 is not 1/10
        big = entropy_lower_bound_mp(0, 10**30, dps=50)
        assert abs(big - mpmath.log(mpmath.mpf(10) ** 30)) < mpmath.mpf(10) ** -45
    for bad, exc in (("0.1", TypeError), (b"1", TypeError), (True, TypeError), (1j, TypeError),
                     (-1, ValueError), (float("nan"), ValueError)):
        with pytest.raises(exc, match="logit_norm"):
            entropy_lower_bound_mp(bad, 3)
    for bad, exc in (("3", TypeError), (2.5, TypeError), (0, ValueError), (True, TypeError)):
        with pytest.raises(exc, match="seq_len"):
            entropy_lower_bound_mp(1.0, bad)
    with pytest.raises(ValueError, match="broadcast"):
        entropy_lower_bound_mp([1.0, 2.0], [2, 3, 4])
    assert entropy_lower_bound_mp(np.zeros(0), 3).shape == (0,)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: minimize_entropy(1.0, 10**20), ValueError, "seq_len"),
    (lambda: minimize_entropy(10**400, 3), ValueError, "logit_norm"),
    (lambda: minimize_entropy(1.0, 3, gtol=True), ValueError, "gtol"),
    (lambda: box_min_entropy("1", 3), TypeError, "bound"),
    (lambda: box_min_entropy(1.0, 10**20), ValueError, "seq_len"),
    (lambda: box_min_entropy_search(1.0, 3, restarts=0), ValueError, "restarts"),
    (lambda: one_hot_counterexample(1, 1.0), ValueError, "seq_len"),
])
def test_certify_rejects_bad_input_naming_it(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_minimize_entropy_uses_the_documented_starts():
    """``restarts`` random starts plus up to ``restarts`` adversarial ones near the other
    critical points (two-valued rows with k = 2 .. T-1 high entries, eq. (6)); every one
    ends at or above h_T(s) and the adversarial ones end where the random ones do."""
    r = minimize_entropy(2.0, 9, restarts=5, seed=3)
    assert len(r.start_values) == 5 + 5
    ref = float(entropy_lower_bound_mp(2.0, 9))
    assert np.all(r.start_values >= ref * (1 - 1e-13))
    np.testing.assert_allclose(r.start_values[5:], ref, rtol=1e-9)
    assert len(minimize_entropy(2.0, 4, restarts=5).start_values) == 5 + 2   # k = 2, 3
    assert len(minimize_entropy(2.0, 2, restarts=5).start_values) == 5       # none for T = 2


@pytest.mark.parametrize("s, t", [(30.0, 5), (60.0, 3), (0.5, 7), (1e-3, 4)])
def test_certify_entropy_and_gradient_are_relatively_accurate(s, t):
    """The objective's H and dH/dz (eq. (6)) against 50-digit mpmath at a random row of norm
    s: 1e-13 relative also for nearly one-hot rows (H ~ 1e-26 at s = 60), where
    log(1 + R) instead of log1p(R), or -p log p summed naively, loses every digit."""
    from theory.certify import _entropy_and_grad
    rng = np.random.default_rng(0)
    z = extremal_logits(s, t) + 1e-3 * s * rng.standard_normal(t)
    h, grad = _entropy_and_grad(z)
    with mpmath.workdps(50):
        zm = [mpmath.mpf(float(v)) for v in z]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in zm))
        p = [mpmath.exp(v - lse) for v in zm]
        h_ref = -mpmath.fsum(pi * (v - lse) for pi, v in zip(p, zm))
        mean = mpmath.fsum(pi * v for pi, v in zip(p, zm))
        g_ref = [float(-pi * (v - mean)) for pi, v in zip(p, zm)]
    assert h == pytest.approx(float(h_ref), rel=1e-13, abs=0)
    np.testing.assert_allclose(grad, g_ref, rtol=1e-10, atol=1e-13 * np.max(np.abs(g_ref)))
