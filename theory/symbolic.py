"""Symbolic proofs (sympy) of each step of the entropy bound and of the sigmaReparam identities.

Every public function states in the first line of its docstring what it proves and returns
:class:`Claim` objects whose ``lhs``, ``rhs`` and ``residual`` are sympy expressions (or
matrices); a claim is proven when ``residual`` simplifies to zero (``claim.holds``).
The tests in ``tests/test_symbolic.py`` assert every claim, and compare the symbolic closed
form numerically with ``theory.bound.entropy_lower_bound`` at many points.

Symbols are positive reals. The sequence length enters as ``m = T - 1 > 0`` so that sympy
knows ``T/(T-1) > 0``; :func:`entropy_bound_expr` returns h_T(s) in the symbols ``s, T``.
Importing this module imports sympy (about a second); ``import theory`` does not.

References are to the equation numbers of ``theory/README.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

__all__ = [
    "Claim",
    "entropy_bound_expr",
    "extremal_entropy",
    "extremal_entropy_vector",
    "theorem_form",
    "derivative_identity",
    "entropy_gradient",
    "lagrange_condition",
    "small_s_series",
    "large_s_asymptotic",
    "large_s_remainder",
    "adam_update_spectral_bound",
    "sigma_reparam_gradient",
    "spectral_norm_gradient",
]

# Positive symbols shared by all derivations.
s, g, m, T = sp.symbols("s g m T", positive=True)
"""``s``: logit norm; ``g``: gap of the extremal row; ``m = T - 1``; ``T``: sequence length."""


@dataclass(frozen=True)
class Claim:
    """An identity ``lhs == rhs`` with its simplified difference ``residual`` (sympy objects).

    Attributes
    ----------
    statement : str
        What the identity says, in words.
    lhs, rhs : sympy.Expr or sympy.Matrix
        The two sides.
    residual : sympy.Expr or sympy.Matrix
        ``simplify(lhs - rhs)``; zero (or a zero matrix) when the identity is proven.

    Examples
    --------
    >>> Claim("x + x = 2x", 2 * s, s + s, sp.Integer(0)).holds
    True
    """

    statement: str
    lhs: object
    rhs: object
    residual: object

    @property
    def holds(self) -> bool:
        """True when ``residual`` is identically zero."""
        r = self.residual
        if isinstance(r, sp.MatrixBase):
            return bool(r.is_zero_matrix)
        return bool(sp.sympify(r) == 0)


def _claim(statement, lhs, rhs, simplifier=sp.simplify):
    if isinstance(lhs, sp.MatrixBase):
        residual = (lhs - rhs).applyfunc(simplifier)
    else:
        residual = simplifier(lhs - rhs)
    return Claim(statement, lhs, rhs, residual)


def _h_of_g(gap, n_low):
    """Closed form of eq. (2) as a function of the gap g and n_low = T - 1 (sympy)."""
    a = n_low * sp.exp(-gap)
    return sp.log(1 + a) + gap * a / (1 + a)


def _check_seq_len(seq_len, minimum=2, maximum=12):
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int, got {seq_len!r}")
    if not minimum <= seq_len <= maximum:
        raise ValueError(f"seq_len must be in [{minimum}, {maximum}] (explicit vectors), got {seq_len}")


def entropy_bound_expr():
    r"""The closed form h_T(s) of eq. (2) as a sympy expression in the symbols ``s`` and ``T``.

    .. math:: h_T(s) = \log(1 + a) + \frac{g a}{1 + a},\quad g = s\sqrt{T/(T-1)},\ a = (T-1)e^{-g}

    Returns
    -------
    sympy.Expr
        In the positive symbols ``theory.symbolic.s`` and ``theory.symbolic.T``.

    Examples
    --------
    >>> h = entropy_bound_expr()
    >>> sp.simplify(h.subs(s, 0) - sp.log(T))
    0
    """
    return _h_of_g(s * sp.sqrt(T / (T - 1)), T - 1)


@lru_cache(maxsize=None)
def extremal_entropy():
    r"""Proves: the extremal row z* = g(e_k - 1/T) of eq. (5) has norm s and entropy h_T(s) of eq. (2).

    The row has one entry g(1 - 1/T) and T - 1 entries -g/T; its entropy is computed from the
    definition :math:`H = -\sum_j p_j \log p_j` with :math:`\log p_j = z_j - \log\sum_i e^{z_i}`.

    Returns
    -------
    tuple of Claim
        ``(norm, mean, entropy)``: :math:`\|z^*\|^2 = s^2` when g = s√(T/(T-1)); the row sums
        to zero (it is centred, eq. (4)); its entropy equals log(1 + a) + g a/(1 + a).

    Examples
    --------
    >>> all(c.holds for c in extremal_entropy())
    True
    """
    n_keys = m + 1
    z_high, z_low = g * (1 - 1 / n_keys), -g / n_keys
    log_z = sp.log(sp.exp(z_high) + m * sp.exp(z_low))
    p_high, p_low = sp.exp(z_high - log_z), sp.exp(z_low - log_z)
    entropy = -(p_high * (z_high - log_z) + m * p_low * (z_low - log_z))
    g_of_s = s * sp.sqrt(n_keys / m)
    norm = _claim("||z*||^2 = s^2 for g = s*sqrt(T/(T-1))",
                  (z_high**2 + m * z_low**2).subs(g, g_of_s), s**2)
    mean = _claim("sum_j z*_j = 0 (centred row)", z_high + m * z_low, sp.Integer(0))
    ent = _claim("H(softmax(z*)) = log(1+a) + g a/(1+a), a = (T-1)e^{-g}",
                 entropy.subs(m, T - 1), _h_of_g(g, T - 1),
                 lambda e: sp.simplify(sp.expand_log(e, force=True)))
    return norm, mean, ent


def extremal_entropy_vector(seq_len):
    """Proves: for a concrete T, the explicit vector z* = s√(T/(T-1))(e_1 - 1/T) has entropy h_T(s).

    Parameters
    ----------
    seq_len : int
        T in [2, 12]; the vector has T symbolic softmax entries.

    Returns
    -------
    Claim
        ``lhs`` the entropy of the explicit softmax vector, ``rhs`` :func:`entropy_bound_expr`
        at this T.

    Raises
    ------
    TypeError
        ``seq_len`` not an int.
    ValueError
        ``seq_len`` outside [2, 12].

    Examples
    --------
    >>> extremal_entropy_vector(3).holds
    True
    """
    _check_seq_len(seq_len)
    t = sp.Integer(seq_len)
    gap = s * sp.sqrt(t / (t - 1))
    z = gap * (sp.Matrix([1] + [0] * (seq_len - 1)) - sp.ones(seq_len, 1) / t)
    log_z = sp.log(sum(sp.exp(zi) for zi in z))
    entropy = -sum(sp.exp(zi - log_z) * (zi - log_z) for zi in z)
    return _claim(f"H(softmax(z*)) = h_{seq_len}(s) for the explicit length-{seq_len} row",
                  entropy, entropy_bound_expr().subs(T, t),
                  lambda e: sp.simplify(sp.simplify(sp.expand_log(e, force=True)).rewrite(sp.exp)))


@lru_cache(maxsize=None)
def theorem_form():
    r"""Proves: the right side of Theorem 3.1, eq. (1), written with β, equals h_T(s) of eq. (2).

    .. math:: \log(1 + (T-1)\beta) + s\sqrt{T(T-1)}\,\beta/(1 + (T-1)\beta),\quad
              \beta = e^{-s\sqrt{T/(T-1)}}

    Examples
    --------
    >>> theorem_form().holds
    True
    """
    n_keys = m + 1
    beta = sp.exp(-s * sp.sqrt(n_keys / m))
    rhs1 = sp.log(1 + m * beta) + s * sp.sqrt(n_keys * m) * beta / (1 + m * beta)
    return _claim("eq. (1) with sigma = s equals eq. (2)", rhs1, _h_of_g(s * sp.sqrt(n_keys / m), m))


@lru_cache(maxsize=None)
def derivative_identity():
    r"""Proves: dh/dg = -g a/(1 + a)² (eq. (2)), so h_T is decreasing in g and in s.

    Returns
    -------
    tuple of Claim
        ``(d_dg, d_ds)``: the derivative in g, and :math:`dh/ds = \sqrt{T/(T-1)}\,dh/dg`;
        ``d_ds.rhs.is_nonpositive`` is True (sympy's sign inference on positive symbols),
        which is the monotonicity used to pass from ‖a_i‖ ≤ 𝛔 to eq. (1).

    Examples
    --------
    >>> d_dg, d_ds = derivative_identity()
    >>> d_dg.holds and d_ds.holds and bool(d_ds.rhs.is_nonpositive)
    True
    """
    a = m * sp.exp(-g)
    d_dg = _claim("dh/dg = -g a/(1+a)^2", sp.diff(_h_of_g(g, m), g), -g * a / (1 + a) ** 2)
    factor = sp.sqrt((m + 1) / m)
    g_of_s = s * factor
    a_s = m * sp.exp(-g_of_s)
    d_ds = _claim("dh/ds = -sqrt(T/(T-1)) g a/(1+a)^2 <= 0",
                  sp.diff(_h_of_g(g_of_s, m), s), -factor * g_of_s * a_s / (1 + a_s) ** 2)
    return d_dg, d_ds


def _softmax_symbols(seq_len):
    z = sp.Matrix(sp.symbols(f"z0:{seq_len}", real=True))
    denom = sum(sp.exp(zi) for zi in z)
    p = z.applyfunc(lambda zi: sp.exp(zi) / denom)
    return z, p


def entropy_gradient(seq_len=3):
    r"""Proves: ∂H/∂z_k = -p_k (z_k - Σ_j p_j z_j) for the softmax entropy, eq. (6).

    Parameters
    ----------
    seq_len : int, default 3
        T in [2, 6]: the identity is checked on T free symbols z_0, ..., z_{T-1}.

    Returns
    -------
    Claim
        Column matrices: ``lhs`` the gradient of :math:`-\sum p_j \log p_j` by sympy.diff,
        ``rhs`` the formula; ``residual`` the zero matrix.

    Raises
    ------
    TypeError
        ``seq_len`` not an int.
    ValueError
        ``seq_len`` outside [2, 6].

    Examples
    --------
    >>> entropy_gradient(2).holds
    True
    """
    _check_seq_len(seq_len, maximum=6)
    z, p = _softmax_symbols(seq_len)
    entropy = -sum(pi * sp.log(pi) for pi in p)
    lhs = sp.Matrix([sp.diff(entropy, zk) for zk in z])
    mean_p = sum(p[j] * z[j] for j in range(seq_len))
    rhs = sp.Matrix([-p[k] * (z[k] - mean_p) for k in range(seq_len)])
    return _claim(f"dH/dz_k = -p_k (z_k - sum_j p_j z_j), T = {seq_len}", lhs, rhs,
                  lambda e: sp.simplify(sp.expand_log(e, force=True)))


@lru_cache(maxsize=None)
def lagrange_condition():
    r"""Proves: at z* the entropy gradient equals λ z* with λ = -T p_high p_low (eq. (6)).

    Uses the gradient formula of eq. (6) on the two-valued row z* (one entry g(1 - 1/T),
    T - 1 entries -g/T) for symbolic T. So z* is a critical point of H on the sphere
    ‖z‖ = s within the centred plane (the gradient sums to zero, being parallel to z*),
    with multiplier λ < 0: moving outward along z* lowers the entropy.

    Returns
    -------
    tuple of Claim
        ``(high, low)``: ∂H/∂z_k = λ z*_k for the high entry and for each low entry.

    Examples
    --------
    >>> all(c.holds for c in lagrange_condition())
    True
    """
    n_keys = m + 1
    z_high, z_low = g * m / n_keys, -g / n_keys
    denom = sp.exp(z_high) + m * sp.exp(z_low)
    p_high, p_low = sp.exp(z_high) / denom, sp.exp(z_low) / denom
    mean_p = p_high * z_high + m * p_low * z_low
    lam = -n_keys * p_high * p_low
    high = _claim("dH/dz_high = lambda z*_high", -p_high * (z_high - mean_p), lam * z_high)
    low = _claim("dH/dz_low = lambda z*_low", -p_low * (z_low - mean_p), lam * z_low)
    return high, low


@lru_cache(maxsize=None)
def small_s_series():
    r"""Proves: h_T(s) = log T - s²/(2T) + c₃ s³ + O(s⁴) at s = 0, eq. (8), with c₃ = -(T-2)/(3√(T-1) T^{3/2}).

    Returns
    -------
    tuple of Claim
        ``(second_order, cubic)``: the Taylor polynomial of degree 2 equals log T - s²/(2T);
        the coefficient of s³ equals c₃ (zero at T = 2).

    Examples
    --------
    >>> all(c.holds for c in small_s_series())
    True
    """
    h = _h_of_g(s * sp.sqrt((m + 1) / m), m)
    taylor = sp.series(h, s, 0, 4).removeO()
    second = _claim("h_T(s) = log T - s^2/(2T) + O(s^3)",
                    sum(taylor.coeff(s, k) * s**k for k in range(3)).subs(m, T - 1),
                    sp.log(T) - s**2 / (2 * T))
    cubic = _claim("[s^3] h_T(s) = -(T-2)/(3 sqrt(T-1) T^(3/2))",
                   taylor.coeff(s, 3).subs(m, T - 1),
                   -(T - 2) / (3 * sp.sqrt(T - 1) * T ** sp.Rational(3, 2)))
    return second, cubic


def _large_s_ratio():
    """(g, h_T(s) / ((T-1)(1+g)e^{-g})) with g = s sqrt(T/(T-1)), eq. (9)."""
    g_of_s = s * sp.sqrt((m + 1) / m)
    return g_of_s, _h_of_g(g_of_s, m) / (m * (1 + g_of_s) * sp.exp(-g_of_s))


@lru_cache(maxsize=None)
def large_s_remainder():
    r"""Proves: the remainder of eq. (9) is o(1/g): :math:`g\,(h_T(s)/((T-1)(1+g)e^{-g}) - 1) 	o 0`.

    So the form (T-1)(1+g)e^{-g} is pinned beyond its leading order: the plausible
    (T-1) g e^{-g}, whose ratio also tends to 1, has g (ratio - 1) -> 1 instead.

    Returns
    -------
    Claim
        ``lhs`` the limit as s -> oo, ``rhs`` 0.

    Examples
    --------
    >>> large_s_remainder().holds
    True
    """
    g_of_s, ratio = _large_s_ratio()
    return _claim("lim g (h_T(s) / ((T-1)(1+g)e^{-g}) - 1) = 0",
                  sp.limit(g_of_s * (ratio - 1), s, sp.oo), sp.Integer(0))


@lru_cache(maxsize=None)
def large_s_asymptotic():
    r"""Proves: h_T(s) ~ (T-1)(1+g)e^{-g} with g = s√(T/(T-1)) as s → ∞, eq. (9); dropping √(T/(T-1)) is wrong.

    Returns
    -------
    tuple of Claim
        ``(kept, dropped)``: ``kept.lhs`` is :math:`\lim_{s\to\infty} h_T(s)/((T-1)(1+g)e^{-g})`
        (= 1); ``dropped.lhs`` is :math:`\lim_{s\to\infty} h_T(s)/(T s e^{-s})`, the
        "Ω(T𝛔e^{-𝛔})" summary, which is 0 for every T ≥ 2 (the summary's rate is
        exponentially too slow), shown by writing √(T/(T-1)) = 1 + δ with δ > 0.

    Examples
    --------
    >>> all(c.holds for c in large_s_asymptotic())
    True
    """
    g_of_s, ratio = _large_s_ratio()
    kept = sp.limit(ratio, s, sp.oo)
    # h / (T s e^{-s}) = [h / ((T-1)(1+g)e^{-g})] * [(T-1)(1+g) e^{-(g-s)} / (T s)], g = (1+δ)s.
    delta = sp.Symbol("delta", positive=True)
    second = sp.limit(m * (1 + (1 + delta) * s) * sp.exp(-delta * s) / ((m + 1) * s), s, sp.oo)
    return (_claim("lim h_T(s) / ((T-1)(1+g)e^{-g}) = 1", kept, sp.Integer(1)),
            _claim("lim h_T(s) / (T s e^{-s}) = 0", kept * second, sp.Integer(0)))


def adam_update_spectral_bound(width=2):
    r"""Proves Prop. 3.2 (eq. (14)): for Δ = μ/√(μ²+n²) entrywise, σ(Δ)² ≥ ‖Δ‖²_F/w = w(1 - Σ n²/(μ²+n²)/w²).

    The Frobenius identity is checked for a w×w matrix of free symbols; the rank inequality
    σ_max² ≥ ‖Δ‖²_F / w is proven for w = 2 by writing
    :math:`\sigma_{\max}^2 - \|\Delta\|_F^2/2 = \sqrt{D}/2` with D a sum of squares.
    A scalar's idealised update |μ|/√(μ²+n²) is at most 1, whatever the width.

    Parameters
    ----------
    width : int, default 2
        w in [2, 4] for the Frobenius identity.

    Returns
    -------
    tuple of Claim
        ``(frobenius, discriminant, scalar)``: ‖Δ‖²_F = w²(1 - (1/w²)Σ n²/(μ²+n²));
        for a 2×2 matrix, tr(ΔᵀΔ)² - 4 det(Δ)² equals an explicit sum of squares (so the top
        eigenvalue of ΔᵀΔ is at least half its trace); 1 - μ²/(μ²+n²) = n²/(μ²+n²) ≥ 0.

    Raises
    ------
    TypeError
        ``width`` not an int.
    ValueError
        ``width`` outside [2, 4].

    Examples
    --------
    >>> frob, disc, scalar = adam_update_spectral_bound(2)
    >>> frob.holds and disc.holds and scalar.holds and bool(scalar.rhs.is_nonnegative)
    True
    """
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"width must be an int, got {width!r}")
    if not 2 <= width <= 4:
        raise ValueError(f"width must be in [2, 4], got {width}")
    mu = sp.Matrix(width, width, sp.symbols(f"mu0:{width * width}", real=True))
    noise = sp.Matrix(width, width, sp.symbols(f"n0:{width * width}", positive=True))
    delta = sp.Matrix(width, width, lambda i, j: mu[i, j] / sp.sqrt(mu[i, j] ** 2 + noise[i, j] ** 2))
    ratio_sum = sum(noise[k] ** 2 / (mu[k] ** 2 + noise[k] ** 2) for k in range(width * width))
    frobenius = _claim("||Delta||_F^2 = w^2 (1 - sum n^2/(mu^2+n^2) / w^2)",
                       sum(d**2 for d in delta), width**2 * (1 - ratio_sum / width**2))
    d = sp.Matrix(2, 2, sp.symbols("d0:4", real=True))
    gram = d.T * d
    disc = sp.expand(gram.trace() ** 2 - 4 * d.det() ** 2)
    sos = (d[0, 0] ** 2 + d[1, 0] ** 2 - d[0, 1] ** 2 - d[1, 1] ** 2) ** 2 \
        + 4 * (d[0, 0] * d[0, 1] + d[1, 0] * d[1, 1]) ** 2
    discriminant = _claim("tr(D^T D)^2 - 4 det(D)^2 is a sum of squares", disc, sp.expand(sos))
    mu1, n1 = sp.Symbol("mu", real=True), sp.Symbol("n", positive=True)
    scalar = _claim("1 - mu^2/(mu^2+n^2) = n^2/(mu^2+n^2) >= 0",
                    1 - mu1**2 / (mu1**2 + n1**2), n1**2 / (mu1**2 + n1**2))
    return frobenius, discriminant, scalar


def sigma_reparam_gradient(rows=2, cols=3):
    r"""Proves eq. (13): for Ŵ = γW/σ with σ = vᵀWu, ∂L/∂W = (γ/σ)(G - (⟨G,W⟩/σ) v uᵀ), and ⟨∂L/∂W, W⟩ = 0.

    The loss is L = ⟨G, Ŵ⟩ (its gradient in Ŵ is the free symbolic matrix G, which is the
    general case by the chain rule); u, v are free symbolic vectors held constant, as in the
    power iteration of eq. (12) (no gradient through u, v). That this is the gradient of the
    true spectral norm when u, v are its singular vectors is :func:`spectral_norm_gradient`.

    Parameters
    ----------
    rows, cols : int
        Shape of W, each in [1, 4].

    Returns
    -------
    tuple of Claim
        ``(gradient, scale_invariance)``: matrices ``sympy.diff(L, W_ij)`` against the formula;
        ⟨∂L/∂W, W⟩ against 0 (rescaling W does not change Ŵ).

    Raises
    ------
    TypeError
        ``rows`` or ``cols`` not an int.
    ValueError
        ``rows`` or ``cols`` outside [1, 4].

    Examples
    --------
    >>> all(c.holds for c in sigma_reparam_gradient(2, 2))
    True
    """
    for name, val in (("rows", rows), ("cols", cols)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {val!r}")
        if not 1 <= val <= 4:
            raise ValueError(f"{name} must be in [1, 4], got {val}")
    w = sp.Matrix(rows, cols, sp.symbols(f"w0:{rows * cols}", real=True))
    grad_out = sp.Matrix(rows, cols, sp.symbols(f"G0:{rows * cols}", real=True))
    u = sp.Matrix(sp.symbols(f"u0:{cols}", real=True))
    v = sp.Matrix(sp.symbols(f"v0:{rows}", real=True))
    gamma = sp.Symbol("gamma", positive=True)
    sigma = (v.T * w * u)[0, 0]
    inner = lambda a, b: sum(a[k] * b[k] for k in range(rows * cols))  # noqa: E731
    loss = gamma * inner(grad_out, w) / sigma
    lhs = sp.Matrix(rows, cols, lambda i, j: sp.diff(loss, w[i, j]))
    rhs = gamma / sigma * (grad_out - inner(grad_out, w) / sigma * v * u.T)
    gradient = _claim("dL/dW = (gamma/sigma)(G - (<G,W>/sigma) v u^T)", lhs, rhs)
    invariance = _claim("<dL/dW, W> = 0", inner(rhs, w), sp.Integer(0))
    return gradient, invariance


def spectral_norm_gradient(matrix=((2, 1), (0, 1))):
    r"""Proves: for a 2×2 matrix with distinct singular values, ∂σ_max/∂W = v uᵀ (used in eq. (13)).

    σ_max is the exact closed form :math:`\sqrt{(F + \sqrt{F^2 - 4\det(W)^2})/2}`,
    F = ‖W‖²_F, differentiated symbolically and evaluated at ``matrix``; u is the top
    eigenvector of WᵀW and v = Wu/σ, both exact (radicals).

    Parameters
    ----------
    matrix : 2×2 nested sequence of int or sympy.Rational
        Must have two distinct singular values.

    Returns
    -------
    Claim
        ``lhs`` the gradient matrix, ``rhs`` v uᵀ, ``residual`` the zero matrix.

    Raises
    ------
    TypeError
        Entries not rational (int or sympy.Rational).
    ValueError
        Not 2x2, or the two singular values coincide.

    Examples
    --------
    >>> spectral_norm_gradient().holds
    True
    """
    if isinstance(matrix, (str, bytes)):
        raise TypeError(f"matrix must be a 2x2 nested sequence of rationals, got {matrix!r}")
    try:
        w0 = sp.Matrix(matrix)
    except (TypeError, ValueError, sp.SympifyError) as exc:
        raise TypeError(f"matrix must be a 2x2 nested sequence of rationals, got {matrix!r}") from exc
    if w0.shape != (2, 2):
        raise ValueError(f"matrix must be 2x2, got shape {w0.shape}")
    if not all(x.is_rational for x in w0):
        raise TypeError("matrix entries must be rational (int or sympy.Rational)")
    gram = w0.T * w0
    if (gram.trace() ** 2 - 4 * gram.det()) == 0:
        raise ValueError("matrix must have two distinct singular values")
    ws = sp.symbols("w0:4", real=True)
    w = sp.Matrix(2, 2, ws)
    frob = sum(x**2 for x in ws)
    sigma = sp.sqrt((frob + sp.sqrt(frob**2 - 4 * w.det() ** 2)) / 2)
    at = dict(zip(ws, list(w0)))
    lhs = sp.Matrix(2, 2, lambda i, j: sp.diff(sigma, w[i, j]).subs(at))
    top, _, vecs = max(gram.eigenvects(), key=lambda e: e[0])
    u = vecs[0] / sp.sqrt((vecs[0].T * vecs[0])[0, 0])
    v = w0 * u / sp.sqrt(top)
    # exact arithmetic on radicals: rationalise denominators, then expand
    return _claim("d sigma_max / dW = v u^T", lhs, v * u.T, lambda e: sp.expand(sp.radsimp(e)))
