"""Every symbolic derivation of theory.symbolic holds, and agrees with the numerics."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from theory import symbolic as S
from theory.bound import entropy_lower_bound
from theory.certify import entropy_lower_bound_mp

ALL_CLAIMS = {
    "extremal_entropy": S.extremal_entropy,
    "theorem_form": S.theorem_form,
    "derivative_identity": S.derivative_identity,
    "entropy_gradient_T2": lambda: S.entropy_gradient(2),
    "entropy_gradient_T3": lambda: S.entropy_gradient(3),
    "lagrange_condition": S.lagrange_condition,
    "small_s_series": S.small_s_series,
    "large_s_asymptotic": S.large_s_asymptotic,
    "adam_update_spectral_bound_w2": lambda: S.adam_update_spectral_bound(2),
    "adam_update_spectral_bound_w3": lambda: S.adam_update_spectral_bound(3),
    "sigma_reparam_gradient": S.sigma_reparam_gradient,
    "sigma_reparam_gradient_3x2": lambda: S.sigma_reparam_gradient(3, 2),
    "spectral_norm_gradient": S.spectral_norm_gradient,
}


@pytest.mark.parametrize("name", sorted(ALL_CLAIMS))
def test_claim_simplifies_to_zero(name):
    claims = ALL_CLAIMS[name]()
    claims = claims if isinstance(claims, tuple) else (claims,)
    for c in claims:
        assert isinstance(c, S.Claim) and c.statement
        assert isinstance(c.lhs, (sp.Basic, sp.MatrixBase))
        assert c.holds, f"{c.statement}: residual {c.residual}"


@pytest.mark.parametrize("t", [2, 3, 5, 6])
def test_explicit_extremal_row_has_entropy_h(t):
    assert S.extremal_entropy_vector(t).holds


def test_symbolic_closed_form_matches_numeric_bound_at_many_points():
    """The expression sympy derived is the one theory.bound evaluates (and mpmath, 40 digits)."""
    rng = np.random.default_rng(0)
    s = np.r_[rng.uniform(0, 20, 200), 0.0, 1e-3, 50.0]
    t = np.r_[rng.integers(2, 5000, 200), 2, 3, 64]
    h_mp = sp.lambdify((S.s, S.T), S.entropy_bound_expr(), "mpmath")
    with mpmath.workdps(40):
        sym = np.array([h_mp(mpmath.mpf(si), mpmath.mpf(int(ti))) for si, ti in zip(s, t)])
    np.testing.assert_allclose(sym.astype(float), entropy_lower_bound(s, t), rtol=1e-12, atol=0)
    ref = entropy_lower_bound_mp(s, t, dps=40)
    with mpmath.workdps(40):
        # (log(1 + a) in the sympy form loses ~log10(1/a) of the 40 digits for tiny a)
        assert max(abs(a - b) / b for a, b in zip(sym, ref)) < mpmath.mpf(10) ** -15


def test_extremal_entropy_expression_is_not_vacuous():
    """The derived entropy equals h_T(s), and NOT the same formula with the gap g replaced by
    s (the "dropped sqrt(T/(T-1))" variant): the comparison can tell them apart."""
    _, _, ent = S.extremal_entropy()
    f = sp.lambdify((S.g, S.T), ent.lhs, "mpmath")
    wrong = sp.lambdify((S.s, S.T), S.entropy_bound_expr().subs(S.s, S.s * sp.sqrt((S.T - 1) / S.T)),
                       "mpmath")
    for t, s in [(2, 1.0), (5, 0.3), (16, 4.0)]:
        g = s * np.sqrt(t / (t - 1))
        assert abs(f(g, t) - entropy_lower_bound(s, t)) < 1e-13
        assert abs(wrong(s, t) - entropy_lower_bound(s, t)) > 1e-4


def test_derivative_is_negative_and_matches_finite_differences():
    d_dg, d_ds = S.derivative_identity()
    assert d_ds.rhs.is_nonpositive
    dh = sp.lambdify((S.s, S.m), d_ds.rhs, "numpy")
    for t in [2, 7, 100]:
        s = np.linspace(0.05, 12, 40)
        eps = 1e-6
        fd = (entropy_lower_bound(s + eps, t) - entropy_lower_bound(s - eps, t)) / (2 * eps)
        np.testing.assert_allclose(dh(s, t - 1), fd, rtol=1e-5, atol=1e-9)
        assert np.all(dh(s, t - 1) < 0)


def test_lagrange_multiplier_is_negative():
    high, low = S.lagrange_condition()
    lam = sp.simplify(high.rhs / (S.g * S.m / (S.m + 1)))
    assert lam.is_negative


def test_small_s_series_numerically():
    second, cubic = S.small_s_series()
    for t in [2, 3, 10, 64]:
        with mpmath.workdps(50):
            s = mpmath.mpf("1e-3")
            rest = entropy_lower_bound_mp(s, t) - (mpmath.log(t) - s**2 / (2 * t))
            c3 = float(cubic.rhs.subs(S.T, t))
            assert abs(float(rest / s**3) - c3) < 1e-4   # the remainder is O(s^4)
    assert cubic.rhs.subs(S.T, 2) == 0


def test_large_s_asymptotic_numerically():
    """Ratio to (T-1)(1+g)e^{-g} tends to 1; ratio to T s e^{-s} tends to 0."""
    for t in [2, 10, 64]:
        ratios = []
        for s in [10, 20, 40]:
            with mpmath.workdps(50):
                g = mpmath.mpf(s) * mpmath.sqrt(mpmath.mpf(t) / (t - 1))
                h = entropy_lower_bound_mp(s, t)
                ratios.append(h / ((t - 1) * (1 + g) * mpmath.exp(-g)))
                popular = h / (t * s * mpmath.exp(-s))
        assert abs(ratios[-1] - 1) < abs(ratios[0] - 1) and abs(ratios[-1] - 1) < 1e-6
        assert popular < mpmath.exp(-40 * (mpmath.sqrt(mpmath.mpf(t) / (t - 1)) - 1) / 2)


@given(w=st.integers(2, 24), seed=st.integers(0, 2**16), noise=st.floats(0.01, 10))
def test_prop_3_2_holds_for_random_adam_statistics(w, seed, noise):
    """Prop. 3.2 (eq. (14)): sigma(Delta) >= sqrt(w) sqrt(1 - sum n^2/(mu^2+n^2) / w^2)."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((w, w))
    n = noise * rng.uniform(0.1, 1.0, (w, w))
    delta = mu / np.sqrt(mu**2 + n**2)
    bound = np.sqrt(w) * np.sqrt(1 - np.sum(n**2 / (mu**2 + n**2)) / w**2)
    assert np.linalg.norm(delta, 2) >= bound * (1 - 1e-12)


def test_prop_3_2_spectral_update_grows_like_sqrt_width():
    """With little noise the bound is ~sqrt(w): the update's spectral norm grows with width."""
    rng = np.random.default_rng(1)
    sig = [np.linalg.norm(np.sign(rng.standard_normal((w, w))), 2) / np.sqrt(w) for w in (8, 64)]
    assert min(sig) >= 1.0 - 1e-12


def test_sigma_reparam_gradient_matches_finite_differences_of_true_spectral_norm():
    """eq. (13) with the true top singular vectors equals the numerical gradient of
    L(W) = <G, gamma W / ||W||_2>."""
    rng = np.random.default_rng(0)
    w, grad_out, gamma = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), 1.7
    loss = lambda m: gamma * np.sum(grad_out * m) / np.linalg.norm(m, 2)  # noqa: E731
    u_svd, sv, vt = np.linalg.svd(w)
    v, u, sigma = u_svd[:, 0], vt[0], sv[0]
    formula = gamma / sigma * (grad_out - np.sum(grad_out * w) / sigma * np.outer(v, u))
    eps = 1e-6
    fd = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        e = np.zeros_like(w)
        e[idx] = eps
        fd[idx] = (loss(w + e) - loss(w - e)) / (2 * eps)
    np.testing.assert_allclose(formula, fd, rtol=1e-6, atol=1e-8)
    assert abs(np.sum(formula * w)) < 1e-12


@pytest.mark.parametrize("call, exc", [
    (lambda: S.extremal_entropy_vector(1), ValueError),
    (lambda: S.extremal_entropy_vector(3.0), TypeError),
    (lambda: S.entropy_gradient(True), TypeError),
    (lambda: S.adam_update_spectral_bound(9), ValueError),
    (lambda: S.sigma_reparam_gradient(0, 2), ValueError),
    (lambda: S.spectral_norm_gradient(((1, 0), (0, 1))), ValueError),
    (lambda: S.spectral_norm_gradient(((1, 0, 0), (0, 1, 0))), ValueError),
    (lambda: S.spectral_norm_gradient(((0.5, 0), (0, 1))), TypeError),
])
def test_rejects_bad_input(call, exc):
    with pytest.raises(exc):
        call()
