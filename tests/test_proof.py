"""theory.proof: the proof's computational steps pass, and the certifiers reject wrong claims."""
from __future__ import annotations

import subprocess
from fractions import Fraction
import sys
from pathlib import Path

import mpmath
import pytest
import sympy as sp
from flint import arb, fmpq

import theory.proof as proof
from theory.proof import (STEPS, Step, certify_identity, certify_positive, h_arb, main,
                          two_valued_entropy_arb)

ROOT = Path(__file__).resolve().parents[1]


def test_fast_run_passes_every_step(capsys):
    """`python -m theory.proof` (what `make test` runs): every checked step passes, exit 0."""
    assert main([]) == 0
    out = capsys.readouterr().out
    checked = [s for s in STEPS if s.check is not None]
    assert out.count("[PASS") == len(checked) and "[FAIL" not in out
    assert "ALL STEPS PASSED (fast run" in out
    for s in STEPS:                                  # every step, paper ones too, is printed
        assert s.key in out


def test_the_chain_has_every_link():
    """The proof's links are all registered (README steps 4-6 and Tightness)."""
    keys = [s.key for s in STEPS]
    for key in ("reduce", "gradient", "ray", "existence", "first-order", "second-variation",
                "second-order", "phi", "two-values", "one-high", "h-decreasing", "monotone-T",
                "planar", "d=1", "d=1-constant"):
        assert key in keys
    assert {s.kind for s in STEPS} == {"paper", "sympy", "arb"}


# ---------------------------------------------------------------- wrong claims must FAIL
x, mu = sp.symbols("x mu", real=True)
Z, kappa = sp.symbols("Z kappa", positive=True)


@pytest.mark.parametrize("lhs, rhs", [
    # phi'' with the inflection at mu - 1 instead of mu - 2 (wrong by e^x/Z)
    (sp.diff(sp.exp(x) * (x - mu) / Z - kappa * x, x, 2), sp.exp(x) * (1 + x - mu) / Z),
    # the limit of phi' at -oo with the wrong sign (would allow a third root)
    (sp.limit(sp.diff(sp.exp(x) * (x - mu) / Z - kappa * x, x), x, -sp.oo), kappa),
    # a matrix identity off in one entry
    (sp.Matrix([[1, 0], [0, 1]]) * Z, sp.Matrix([[Z, 0], [0, Z + 1]])),
])
def test_certify_identity_rejects_wrong_identities(lhs, rhs):
    res = certify_identity(lhs, rhs)
    assert not res.ok and "FALSE" in res.detail


def test_a_wrong_gradient_fails_the_registered_step(monkeypatch):
    """Swap the gradient formula's sign of mu: the `gradient` step must fail, and main exits 1."""
    real = proof.certify_identity

    def tampered(lhs, rhs, **kw):
        return real(lhs, rhs.subs(proof._S, -proof._S), **kw)

    monkeypatch.setattr(proof, "certify_identity", tampered)
    assert not proof._step_gradient(False).ok
    assert main(["--only", "gradient"]) == 1


def test_a_deliberately_wrong_step_makes_the_run_fail(capsys):
    """A wrong claim added to the registry: the certifier reports FAIL and the exit status is 1."""
    wrong = Step("wrong", "second variation with +2 lambda (wrong sign)", "sympy", "nowhere",
                 lambda full: certify_identity(
                     -2 * sp.exp(x) / Z * (1 + x - mu) - 2 * kappa,
                     -2 * sp.diff(sp.exp(x) * (x - mu) / Z - kappa * x, x)))
    assert main(["--only", "wrong", "reduce"], steps=STEPS + (wrong,)) == 1
    out = capsys.readouterr().out
    assert "[FAIL sympy] wrong" in out and "SOME STEP FAILED" in out


def test_a_crashing_step_fails():
    def boom(full):
        raise RuntimeError("boom")
    assert main(["--only", "boom"], steps=(Step("boom", "crash", "arb", "nowhere", boom),)) == 1


def test_certify_positive_rejects_the_box_one_hot_formula():
    """README eq. (11): on the box |z_j| <= b the one-hot formula with gap 2b is not a lower
    bound (T = 10, b = 1): the row with two logits at +b lies below it; arb certifies the sign."""
    T, G = 10, arb(2)

    def ent(k):                                       # k logits at +b, T - k at -b (gap G)
        Zk = k + (T - k) * (-G).exp()
        return Zk.log() + (T - k) * G * (-G).exp() / Zk

    res = certify_positive([("two-high minus one-hot formula", ent(2) - ent(1))])
    assert not res.ok and "not certified" in res.detail
    assert certify_positive([("one-hot formula minus two-high", ent(1) - ent(2))]).ok


def test_certify_positive_rejects_decreasing_in_T_and_unresolved_balls():
    s = fmpq(3, 2)
    assert not certify_positive([("h_T - h_{T+1}", h_arb(s, 7) - h_arb(s, 8))]).ok
    assert not certify_positive([("zero ball", arb(0, 1e-30))]).ok
    assert not certify_positive([]).ok


def test_a_wrong_bound_fails_the_random_rows(monkeypatch):
    """The popular summary's exponent (g = s instead of s sqrt(T/(T-1))) gives a value above
    the true minimum: the random-row corroboration (rows near the one-high shape) catches it."""
    def wrong_h(s, T):
        a = (T - 1) * (-arb(s)).exp()
        return a.log1p() + arb(s) * a / (1 + a)

    monkeypatch.setattr(proof, "h_arb", wrong_h)
    res = proof._step_random_rows(False)
    assert not res.ok and "not certified" in res.detail


def test_a_wrong_two_valued_entropy_fails(monkeypatch):
    """If the n-high rows had the one-high row's gap they would beat it: the step must fail."""
    def wrong(s, T, n):
        G = arb(s) * (arb(T) / (T - 1)).sqrt()
        a = arb(T - n) / n * (-G).exp()
        return arb(n).log() + a.log1p() + G * a / (1 + a) - 1
    monkeypatch.setattr(proof, "two_valued_entropy_arb", wrong)
    assert not proof._step_two_valued(False).ok


# ------------------------------------------------------- the arb closed forms vs mpmath
def _entropy_mp(z):
    zmax = max(z)
    e = [mpmath.exp(v - zmax) for v in z]
    Zs = mpmath.fsum(e)
    return mpmath.log(Zs) - mpmath.fsum(ei * (v - zmax) for ei, v in zip(e, z)) / Zs


@pytest.mark.parametrize("T, n, s", [(2, 1, "0.5"), (3, 2, "1.25"), (7, 3, "4"), (12, 11, "0.001"),
                                     (40, 1, "30"), (40, 17, "9.5")])
def test_two_valued_entropy_matches_the_explicit_row(T, n, s):
    """Independent reference: build the n-high row of centred norm s explicitly (mpmath, 60
    digits) and compute its entropy from the definition."""
    with mpmath.workdps(60):
        sm = mpmath.mpf(Fraction(s).numerator) / Fraction(s).denominator
        G = sm * mpmath.sqrt(mpmath.mpf(T) / (n * (T - n)))
        z = [G] * n + [mpmath.mpf(0)] * (T - n)
        zbar = mpmath.fsum(z) / T
        assert mpmath.almosteq(mpmath.sqrt(mpmath.fsum((v - zbar) ** 2 for v in z)), sm, 1e-50)
        ref = _entropy_mp(z)
        frac = fmpq(Fraction(s).numerator, Fraction(s).denominator)
        got = two_valued_entropy_arb(frac, T, n)
        assert got.overlaps(arb(mpmath.nstr(ref, 55))) or abs(float(got.mid()) - float(ref)) < 1e-40
        if n == 1:
            assert h_arb(frac, T).overlaps(got)


@pytest.mark.parametrize("T, n, s", [(3, 2, "1.5"), (5, 2, "0.75"), (6, 4, "3"), (4, 1, "2"),
                                     (9, 1, "0.5")])
def test_phi_prime_is_the_second_derivative_along_the_sphere(T, n, s):
    """Independent check of the second-order quantity (README step 4 (c)): along the great
    circle z cos t + v sin t with v = (s/sqrt 2)(e_j - e_k) for two equal entries, the second
    derivative of the entropy at t = 0 (mpmath numerical differentiation) equals -s^2 phi'(x)."""
    with mpmath.workdps(40):
        sm = mpmath.mpf(Fraction(s).numerator) / Fraction(s).denominator
        G = sm * mpmath.sqrt(mpmath.mpf(T) / (n * (T - n)))
        z = [G * (1 - mpmath.mpf(n) / T)] * n + [-G * mpmath.mpf(n) / T] * (T - n)
        j, k = (0, 1) if n >= 2 else (T - 2, T - 1)   # two high keys, or two low keys
        v = [mpmath.mpf(0)] * T
        v[j], v[k] = sm / mpmath.sqrt(2), -sm / mpmath.sqrt(2)

        def H(t):
            return _entropy_mp([zi * mpmath.cos(t) + vi * mpmath.sin(t) for zi, vi in zip(z, v)])

        d2 = mpmath.diff(H, 0, 2)
    frac = fmpq(Fraction(s).numerator, Fraction(s).denominator)
    high, low = proof._second_order_phi_prime(arb(frac), T, n)
    phi_prime = high if n >= 2 else low
    assert float(d2) == pytest.approx(-float(sm) ** 2 * float(phi_prime.mid()), rel=1e-12, abs=1e-30)
    assert (d2 < 0) == (n >= 2)                       # n >= 2: not a local minimum


# --------------------------------------------------------------------------------- CLI
def test_cli_exit_status_and_options():
    run = [sys.executable, "-m", "theory.proof"]
    ok = subprocess.run(run + ["--only", "gradient", "planar"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "[PASS sympy] planar" in ok.stdout
    bad = subprocess.run(run + ["--only", "no-such-step"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-step" in bad.stderr
    listing = subprocess.run(run + ["--list"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0 and all(s.key in listing.stdout for s in STEPS)
