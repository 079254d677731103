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
from theory.certify import adam_update_bound, entropy_lower_bound_mp

ALL_CLAIMS = {
    "extremal_entropy": S.extremal_entropy,
    "theorem_form": S.theorem_form,
    "derivative_identity": S.derivative_identity,
    "entropy_gradient_T2": lambda: S.entropy_gradient(2),
    "entropy_gradient_T3": lambda: S.entropy_gradient(3),
    "lagrange_condition": S.lagrange_condition,
    "small_s_series": S.small_s_series,
    "large_s_asymptotic": S.large_s_asymptotic,
    "large_s_remainder": S.large_s_remainder,
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


@given(w=st.integers(1, 24), c=st.integers(1, 24), seed=st.integers(0, 2**16),
       noise=st.floats(0.0, 10), log_mag=st.floats(-150, 150))
def test_prop_3_2_package_twin_holds_for_random_adam_statistics(w, c, seed, noise, log_mag):
    """Prop. 3.2 (eq. (14)) through the package (theory.certify.adam_update_bound): the bound
    equals the formula computed here independently, sqrt(w) sqrt(1 - sum n^2/(mu^2+n^2)/w^2)
    for square matrices (mpmath, 30 digits, from the raw statistics), and sigma(Delta) (an SVD
    computed here) is >= it. Magnitudes 1e-150 .. 1e150: Delta is scale-free."""
    rng = np.random.default_rng(seed)
    shape = (w, w) if seed % 2 else (w, c)
    mu = rng.standard_normal(shape) * 10.0**log_mag
    n = noise * rng.uniform(0.0, 1.0, shape) * 10.0**log_mag
    mu[mu == 0] = 1.0
    r = adam_update_bound(mu, n)
    sig = np.linalg.svd(mu / np.hypot(mu, n), compute_uv=False)[0]
    assert r.spectral_norm == pytest.approx(sig, rel=1e-12)
    with mpmath.workdps(30):
        ratios = mpmath.fsum(mpmath.mpf(float(b)) ** 2 / (mpmath.mpf(float(a)) ** 2
                                                          + mpmath.mpf(float(b)) ** 2)
                             for a, b in zip(mu.ravel(), n.ravel()))
        rows, cols = shape
        ref = mpmath.sqrt((rows * cols - ratios) / min(rows, cols))
        if rows == cols:   # eq. (14) as written
            ref14 = mpmath.sqrt(rows) * mpmath.sqrt(1 - ratios / rows**2)
            assert abs(ref - ref14) < mpmath.mpf(10) ** -25
    assert r.bound == pytest.approx(float(ref), rel=1e-12)
    assert r.spectral_norm >= r.bound * (1 - 1e-12)


def test_prop_3_2_is_tight_and_grows_like_sqrt_width():
    """Equality for a noiseless Hadamard sign pattern (all singular values equal sqrt(w)), so
    a weaker bound (e.g. ||Delta||_F / w) or a wrong one (sqrt(w) times more) fails here; a
    scalar's update never exceeds 1; with noise n = mu/10 the bound is sqrt(w/1.01)."""
    from scipy.linalg import hadamard
    for w in (2, 8, 64):
        r = adam_update_bound(hadamard(w), 0.0)
        assert r.bound == pytest.approx(np.sqrt(w), rel=1e-14)
        assert r.spectral_norm == pytest.approx(r.bound, rel=1e-12)
        r = adam_update_bound(hadamard(w) * 3.0, 0.3)
        assert r.bound == pytest.approx(np.sqrt(w / 1.01), rel=1e-13)
        assert r.spectral_norm >= r.bound * (1 - 1e-13)
    for mu, n in ((5.0, 0.0), (1e-300, 1e300), (-2.0, 1.0)):
        r = adam_update_bound([[mu]], n)
        assert r.spectral_norm == pytest.approx(r.bound, rel=1e-15) and r.spectral_norm <= 1.0
    # rank one: sigma = ||Delta||_F, far above the bound ||Delta||_F / sqrt(w)
    r = adam_update_bound(np.ones((16, 16)), 0.0)
    assert r.spectral_norm == pytest.approx(16.0) and r.bound == pytest.approx(4.0)


@pytest.mark.parametrize("mean, noise, exc, match", [
    (np.ones(3), 0.1, ValueError, "mean"),
    (np.ones((0, 3)), 0.1, ValueError, "mean"),
    ("1", 0.1, TypeError, "mean"),
    (np.ones((2, 2)), -0.1, ValueError, "noise_std"),
    (np.ones((2, 2)), np.ones(3), ValueError, "noise_std"),
    (np.zeros((2, 2)), 0.0, ValueError, "both 0"),
    (np.full((2, 2), np.nan), 0.1, ValueError, "mean"),
])
def test_adam_update_bound_rejects_bad_input(mean, noise, exc, match):
    with pytest.raises(exc, match=match):
        adam_update_bound(mean, noise)


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
    (lambda: S.spectral_norm_gradient("ab"), TypeError),
    (lambda: S.spectral_norm_gradient(object()), TypeError),
    (lambda: S.entropy_gradient(7), ValueError),
    (lambda: S.adam_update_spectral_bound("2"), TypeError),
])
def test_rejects_bad_input(call, exc):
    with pytest.raises(exc):
        call()


def test_every_public_theory_function_documents_what_it_raises():
    """Issue 13, 6: every public function of theory/ that takes arguments has a ``Raises``
    section naming TypeError/ValueError, and the sympy-free ones are exported by ``theory``."""
    import inspect

    import theory
    from theory import bound, certify, instances
    missing = []
    for mod in (bound, certify, instances, S):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not inspect.isfunction(obj) or not inspect.signature(obj).parameters:
                continue
            doc = inspect.getdoc(obj) or ""
            if "Raises\n------" not in doc or "Error" not in doc.split("Raises\n------")[1]:
                missing.append(f"{mod.__name__}.{name}")
            if mod is not S:
                assert hasattr(theory, name) or name.startswith("box_min_entropy_search"), name
    assert not missing, missing
