"""The bound for concrete attention instances (X, W_Q, W_K): Theorem 3.1 and its sharper variants.

Convention (``theory/README.md``, Notation): logits a = (X W_Q)(X W_K)^T * scale, row i is
query i over the keys; X is (T, d), W_Q and W_K are (d, n).

- :func:`theorem_bound` -- the paper's number h_T(sigma * sigma_x), eq. (1) (per row under a
  causal mask);
- :func:`row_logit_norm_bounds` / :func:`row_entropy_bounds` -- per-row upper bounds s_i on
  the centred logit norm and the entropy bounds h_{T_i}(s_i) for the four variants of
  eq. (7), ordered theorem <= per_query <= centered <= exact, causal or not;
- :func:`extremal_instance` -- the construction that attains eq. (1) with equality.

Every bound here is rounded outward, so that a bound never exceeds the entropy that
:func:`theory.bound.softmax_entropy` measures for the same float64 row:

- the matrices are split as m = m' 2^e with max|m'| in [1/2, 1) (exact), so no product of
  norms overflows or underflows; the powers of two are applied once at the end (a logit-norm
  bound beyond the float64 range becomes ``inf``, and its entropy bound 0);
- every logit-norm bound s_i is rounded *up*: spectral norms (LAPACK SVD) by the relative
  ``4 max(rows, cols) eps``, Euclidean norms by ``(k + 2) eps`` for k terms, products by
  a few eps, and each matrix product that can cancel (W_K W_Q^T, the logits themselves) by
  the standard absolute bound ``k eps |A| |B|`` with Frobenius norms. Centring needs no
  absolute term: a float64 subtraction is correctly rounded (relative error <= eps/2 per
  entry), and the rounding error e of the mean only adds 1 e^T, orthogonal to the centred
  columns, which can only increase the computed norm;
- every entropy bound is rounded *down*: h_{T_i}(s_i) times ``1 - 4 eps (log(T_i-1) + g + 4)``
  (the error bound of :func:`theory.bound.entropy_lower_bound`), and 0 below the smallest
  normal float64 or where e^-g is subnormal (g > 708.4: probabilities that small carry fewer
  than 53 bits, in h and in any measured entropy);
- the order of eq. (7) is made exact: each s_i is the least of its own value and the weaker
  variants' (each is a valid bound), and each entropy bound the largest of its own and the
  weaker variants'.

The price is a relative loss of about ``g x (the s margin) + 4 eps (log T + g + 4)`` in the
bound, ~1e-11 at g = 300 (``tests/test_instances.py``).

numpy only; float64 throughout.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from theory.bound import MAX_ELEMENTS, _h_into, _round_down, entropy_lower_bound

__all__ = ["TheoremBound", "theorem_bound", "row_logit_norm_bounds", "row_entropy_bounds",
           "extremal_instance", "VARIANTS"]

#: the variants of eq. (7), weakest (smallest entropy bound) first
VARIANTS = ("theorem", "per_query", "centered", "exact")

EPS = float(np.finfo(np.float64).eps)
TINY = float(np.finfo(np.float64).tiny)


class TheoremBound(NamedTuple):
    """The paper's bound for one instance, eq. (1).

    Attributes
    ----------
    value : float or numpy.ndarray
        h_T(sigma * sigma_x) in nats, rounded down: every row's entropy is at least this.
        With ``causal=True`` a float64 array of shape (T,): h_{i+1}(sigma * sigma_x) for
        row i, which sees i + 1 keys (row 0 sees one key: 0).
    sigma : float
        ``||W_K W_Q^T||_2 * |scale|`` (float64 rounding of it; may be ``inf`` or 0 when it
        lies outside the float64 range although the product below does not).
    sigma_x : float
        ``||X X^T||_2 = ||X||_2^2`` (as for ``sigma``).
    logit_norm : float
        sigma * sigma_x rounded up, the bound on every row's logit norm, eq. (3); computed
        from scaled matrices, so it is finite whenever the product is (``inf`` beyond the
        float64 range, where ``value`` is 0).
    """

    value: float
    sigma: float
    sigma_x: float
    logit_norm: float


# ----------------------------------------------------------------------------- validation
def _real_matrix(x, name):
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a real array, got {x!r}")
    arr = np.asarray(x)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    return arr


def _check_scalar(v, name):
    """A real number >= 0 (a 0-d array of a real dtype too) as a float; TypeError/ValueError naming it."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {v!r}")
    try:
        x = float(v)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for float64") from None
    if not np.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    return x


def _check_scale(scale):
    if isinstance(scale, (bool, np.bool_)) or np.ndim(scale) != 0:
        raise TypeError(f"scale must be a real scalar, got {scale!r}")
    if not isinstance(scale, (int, float, np.integer, np.floating)):
        if not (isinstance(scale, np.ndarray) and scale.dtype.kind in "iuf"):
            raise TypeError(f"scale must be a real scalar, got {scale!r}")
    try:
        scale = float(scale)
    except OverflowError:
        raise ValueError(f"scale must be finite, got an integer too large for float64") from None
    if not np.isfinite(scale):
        raise ValueError("scale must be finite")
    return scale


def _check_causal(causal):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return bool(causal)


def _check_instance(X, W_Q, W_K, scale):
    X = _real_matrix(X, "X")
    W_Q = _real_matrix(W_Q, "W_Q")
    W_K = _real_matrix(W_K, "W_K")
    if X.shape[0] < 1:
        raise ValueError("X must have at least one token (row)")
    if W_Q.shape[0] != X.shape[1]:
        raise ValueError(f"W_Q must have X.shape[1]={X.shape[1]} rows, got shape {W_Q.shape}")
    if W_K.shape != W_Q.shape:
        raise ValueError(f"W_K must have the shape of W_Q {W_Q.shape}, got {W_K.shape}")
    return X, W_Q, W_K, _check_scale(scale)


def _spectral_norm(m):
    """``||m||_2`` (0 for an empty matrix)."""
    return float(np.linalg.norm(m, 2)) if m.size else 0.0


# ----------------------------------------------------------------- scaled, outward norms
def _split(m):
    """``m = m' 2**e`` with max|m'| in [1/2, 1) (exact); ``(m, 0)`` for a zero matrix."""
    peak = float(np.max(np.abs(m))) if m.size else 0.0
    if peak == 0.0:
        return m, 0
    e = int(np.frexp(peak)[1])
    with np.errstate(under="ignore"):
        return np.ldexp(m, -e), e


def _svd_up(m):
    """An upper bound on ``||m||_2``: LAPACK's value times ``1 + 4 max(m.shape) eps``."""
    return _spectral_norm(m) * (1.0 + 4.0 * max(m.shape, default=1) * EPS)


def _norm_bounds(X, W_Q, W_K, scale, causal, variants=VARIANTS):
    """Upper bounds on the centred logit norm of every row, by variant, as floats (may be inf).

    Returns (bounds, exponent-applied) as a dict name -> float64 array (T,), plus sigma and
    sigma_x rounded to float64 for reporting.
    """
    T, d = X.shape
    n = W_Q.shape[1]
    Xn, ex = _split(X)
    Qn, eq = _split(W_Q)
    Kn, ek = _split(W_K)
    ms, es = np.frexp(abs(scale))
    ms, es = float(ms), int(es)
    out = {}
    with np.errstate(under="ignore", over="ignore"):
        # sigma' = ||Kn Qn^T||_2 bounded above, with the cancellation in the product
        fq, fk = np.linalg.norm(Qn), np.linalg.norm(Kn)
        sig_n = (_svd_up(Kn @ Qn.T) + (n + 2) * EPS * fq * fk) * (1 + 2 * EPS)
        sig_n *= ms * (1 + 2 * EPS)
        e_sig = es + eq + ek
        x2_n = _svd_up(Xn) ** 2 * (1 + 4 * EPS)           # ||X'||_2^2
        sigma = float(np.ldexp(ms * _spectral_norm(Kn @ Qn.T), e_sig))
        sigma_x = float(np.ldexp(_spectral_norm(Xn) ** 2, 2 * ex))
        theorem_n = sig_n * x2_n * (1 + 2 * EPS)
        out["theorem"] = np.full(T, float(np.ldexp(theorem_n, e_sig + 2 * ex)))
        if variants == ("theorem",):
            return out, sigma, sigma_x
        tok_n = np.linalg.norm(Xn, axis=1) * (1 + (d + 2) * EPS)     # ||x_i'|| (T,)
        rows = np.arange(1, T + 1) if causal else np.full(T, T)       # T_i
        prefix = np.empty(T)
        prefix_c = np.empty(T)
        exact_n = np.empty(T)
        fro_prefix = np.sqrt(np.cumsum(np.einsum("ij,ij->i", Xn, Xn)))  # ||X_i'||_F (causal)
        Qx = Xn @ Qn                                                  # (T, n)
        Kx = Xn @ Kn                                                  # (T, n)
        logits_n = Qx @ Kx.T                                          # (T, T), no overflow
        # entrywise error of logits_n <= (2d + n + 4) eps |x_i| |Q'| |K'|^T |x_j|
        c_logit = (2 * d + n + 4) * EPS * fq * fk
        if causal:
            for i in range(T):
                Xi = Xn[: i + 1]
                prefix[i] = _svd_up(Xi)
                centred = Xi - Xi.mean(axis=0)
                prefix_c[i] = _svd_up(centred)        # no absolute term (module docstring)
                ai = logits_n[i, : i + 1]
                exact_n[i] = _centred_norm_up(ai, tok_n[i] * fro_prefix[i] * c_logit)
        else:
            prefix[:] = _svd_up(Xn)
            centred = Xn - Xn.mean(axis=0)
            prefix_c[:] = _svd_up(centred)
            for i in range(T):
                exact_n[i] = _centred_norm_up(logits_n[i], tok_n[i] * fro_prefix[-1] * c_logit)
        scale_x = e_sig + 2 * ex
        out["per_query"] = np.ldexp(sig_n * tok_n * prefix * (1 + 3 * EPS), scale_x)
        out["centered"] = np.ldexp(sig_n * tok_n * prefix_c * (1 + 3 * EPS), scale_x)
        out["exact"] = np.ldexp(ms * exact_n * (1 + 2 * EPS), es + eq + ek + 2 * ex)
    # the order of eq. (7), exactly: each is a valid bound, so is the least of them
    for weak, strong in zip(VARIANTS, VARIANTS[1:]):
        np.minimum(out[strong], out[weak], out=out[strong])
    return out, sigma, sigma_x


def _centred_norm_up(row, err_abs):
    """An upper bound on ``||r - mean(r)||`` of the exact row r whose float64 value is ``row``,
    with ``|row_j - r_j| <= err_abs`` entrywise."""
    k = row.size
    # centring: relative error only (module docstring); the row's own error: err_abs per entry
    c = np.linalg.norm(row - row.mean()) * (1 + (k + 2) * EPS)
    return c + np.sqrt(k) * err_abs


def _entropy_bounds_down(s, seq):
    """h_{T_i}(s_i) rounded down (0 below the normal range and where e^-g is subnormal);
    s may hold inf (-> 0)."""
    s = np.asarray(s, dtype=np.float64)
    seq = np.broadcast_to(np.asarray(seq, dtype=np.float64), s.shape)
    h = np.empty(s.shape)
    _h_into(s, seq, s.shape, h)
    _round_down(h, s, seq)
    return h


# --------------------------------------------------------------------------- theorem 3.1
def theorem_bound(X, W_Q, W_K, *, scale=1.0, causal=False):
    r"""The paper's entropy lower bound for one attention instance, Theorem 3.1, eq. (1).

    .. math::

        \sigma = \lVert W_K W_Q^\top\rVert_2\,|\mathrm{scale}|,\quad
        \sigma_x = \lVert X X^\top\rVert_2 = \lVert X\rVert_2^2,\quad
        \operatorname{Ent}(A_i) \ge h_T(\sigma\sigma_x)\ \text{for every row } i,

    with h_T of eq. (2) and the logit-norm chain of eq. (3). The value is rounded down and
    the logit norm up (module docstring), so the value never exceeds the entropy that
    :func:`theory.bound.softmax_entropy` measures for any row of the instance; every finite
    instance gets a finite value, also when products of its norms leave the float64 range.

    Masks: the statement is for rows that see all T keys. A row that sees fewer keys can
    have less entropy (under a causal mask row 0 sees one key, entropy 0). With
    ``causal=True`` the value is per row: h_{i+1}(sigma * sigma_x) for row i (valid: its
    logits over the keys 0..i still have norm <= sigma * sigma_x, eq. (3)). Other masks:
    use h_{T_i} with the number T_i of keys row i sees, e.g. through
    :func:`row_entropy_bounds`.

    Parameters
    ----------
    X : array_like, shape (T, d)
        Tokens (any real dtype; computed in float64).
    W_Q, W_K : array_like, shape (d, n)
        Query and key maps.
    scale : float, default 1.0
        Logit scale (e.g. 1/sqrt(n)); its absolute value multiplies sigma.
    causal : bool, default False
        Row i sees only the keys 0..i; ``value`` is then an array of shape (T,).

    Returns
    -------
    TheoremBound
        ``(value, sigma, sigma_x, logit_norm)``: Python floats (``value`` an array when
        ``causal``).

    Raises
    ------
    TypeError
        Non-real arrays or ``scale`` (strings, bools, complex), ``causal`` not a bool.
    ValueError
        Not 2-d, mismatched shapes, no token, non-finite entries or ``scale``.

    Examples
    --------
    The bound holds for every row of a random instance:

    >>> from theory.bound import softmax_entropy
    >>> rng = np.random.default_rng(0)
    >>> X, W_Q, W_K = rng.normal(size=(6, 4)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    >>> b = theorem_bound(X, W_Q, W_K, scale=0.1)
    >>> logits = 0.1 * (X @ W_Q) @ (X @ W_K).T
    >>> bool(np.all(softmax_entropy(logits) >= b.value))
    True

    Tiny tokens and huge weights (products of norms beyond float64, logits of order 1):

    >>> tb = theorem_bound(np.eye(3) * 1e-160, np.eye(3) * 1e160, np.eye(3) * 1e160)
    >>> round(tb.logit_norm, 9), tb.sigma
    (1.0, inf)
    """
    X, W_Q, W_K, scale = _check_instance(X, W_Q, W_K, scale)
    causal = _check_causal(causal)
    T = X.shape[0]
    norms, sigma, sigma_x = _norm_bounds(X, W_Q, W_K, scale, causal, variants=("theorem",))
    s = float(norms["theorem"][0])
    if causal:
        value = _entropy_bounds_down(np.full(T, s), np.arange(1, T + 1))
    else:
        value = float(_entropy_bounds_down(s, T))
    return TheoremBound(value, sigma, sigma_x, s)


# ----------------------------------------------------------------------------- variants
def row_logit_norm_bounds(X, W_Q, W_K, *, scale=1.0, causal=False):
    r"""Per-row upper bounds s_i on the centred logit norm ``||a_i - mean(a_i)||``, eq. (7).

    Row i sees T_i keys: all T, or X_{0..i} (T_i = i+1) when ``causal``. With
    sigma = ``||W_K W_Q^T||_2 |scale|``, X_i the visible keys and P the centring matrix:

    .. math::

        \text{theorem: } \sigma\lVert X\rVert_2^2 \;\ge\;
        \text{per\_query: } \sigma\lVert x_i\rVert\,\lVert X_i\rVert_2 \;\ge\;
        \text{centered: } \sigma\lVert x_i\rVert\,\lVert P X_i\rVert_2 \;\ge\;
        \text{exact: } \lVert a_i - \bar a_i\mathbf 1\rVert_2 .

    "theorem" is the paper's single number sigma * sigma_x of the whole instance (eq. (3));
    "centered" centres the visible keys with their own mean (eq. (4)); "exact" is the row
    itself. Each is valid because a_i - mean(a_i) = scale * P X_i W_K W_Q^T x_i. All are
    rounded up and computed from scaled matrices (module docstring): each is >= the exact
    value for the float64 instance, the order holds exactly, and a value beyond the float64
    range is ``inf``.

    Parameters
    ----------
    X : array_like, shape (T, d)
    W_Q, W_K : array_like, shape (d, n)
    scale : float, default 1.0
    causal : bool, default False
        Row i sees only keys 0..i.

    Returns
    -------
    dict of str to numpy.ndarray
        Keys ``"theorem"``, ``"per_query"``, ``"centered"``, ``"exact"`` (see ``VARIANTS``),
        each a float64 array of shape (T,), elementwise non-increasing in that order.

    Raises
    ------
    TypeError, ValueError
        As :func:`theorem_bound`.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> X, W_Q, W_K = rng.normal(size=(5, 3)), rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    >>> s = row_logit_norm_bounds(X, W_Q, W_K, causal=True)
    >>> bool(np.all(s["theorem"] >= s["per_query"]) and np.all(s["per_query"] >= s["centered"])
    ...      and np.all(s["centered"] >= s["exact"]))
    True
    """
    X, W_Q, W_K, scale = _check_instance(X, W_Q, W_K, scale)
    causal = _check_causal(causal)
    return _norm_bounds(X, W_Q, W_K, scale, causal)[0]


def row_entropy_bounds(X, W_Q, W_K, *, scale=1.0, causal=False):
    r"""Per-row entropy lower bounds h_{T_i}(s_i) for the variants of eq. (7).

    ``s_i`` from :func:`row_logit_norm_bounds`; T_i = T, or i+1 when ``causal``; h of eq. (2).
    Every variant is a valid lower bound of row i's entropy, and they are ordered
    theorem <= per_query <= centered <= exact exactly (each is the largest of its own value
    and the weaker ones'); "exact" is attained, up to the outward rounding, by some row with
    that centred norm (eq. (5)). Rounded down (module docstring): no value exceeds the
    entropy :func:`theory.bound.softmax_entropy` measures for the row.

    Parameters
    ----------
    X, W_Q, W_K, scale, causal
        As in :func:`row_logit_norm_bounds`.

    Returns
    -------
    dict of str to numpy.ndarray
        Same keys as :func:`row_logit_norm_bounds`, float64 arrays of shape (T,), in nats.

    Raises
    ------
    TypeError, ValueError
        As :func:`theorem_bound`.

    Examples
    --------
    >>> from theory.bound import softmax_entropy
    >>> rng = np.random.default_rng(2)
    >>> X, W_Q, W_K = rng.normal(size=(8, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    >>> hb = row_entropy_bounds(X, W_Q, W_K, scale=0.5)
    >>> ent = softmax_entropy(0.5 * (X @ W_Q) @ (X @ W_K).T)
    >>> bool(np.all(ent >= hb["exact"]) and np.all(hb["exact"] >= hb["theorem"]))
    True
    """
    norms = row_logit_norm_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    T = len(norms["exact"])
    seq = np.arange(1, T + 1, dtype=np.float64) if causal else np.full(T, float(T))
    out = {k: _entropy_bounds_down(v, seq) for k, v in norms.items()}
    for weak, strong in zip(VARIANTS, VARIANTS[1:]):
        np.maximum(out[strong], out[weak], out=out[strong])
    return out


# --------------------------------------------------------------------------- tightness
def extremal_instance(sigma, seq_len, dim=None, *, row=0, token_norm=1.0, construction="auto"):
    r"""An instance (X, W_Q, W_K) whose row ``row`` attains Theorem 3.1 with equality.

    Two constructions (``theory/README.md``, "Tightness"), both with rank-one maps
    W_Q = sqrt(sigma) q, W_K = sqrt(sigma) k (unit q, k), so ``||W_K W_Q^T||_2 = sigma``,
    sigma_x = ``||X||_2^2`` = c^2 = ``||x_i||^2``, and row i of the logits is
    sigma c^2 (e_i - 1/T)/``||e_i - 1/T||``: centred, of norm sigma * sigma_x, with the
    one-high shape of eq. (5), so its entropy is h_T(sigma c^2) = ``theorem_bound(X, W_Q,
    W_K).value``.

    - ``"planar"`` (any d >= 2): token i is c e_1, every other token c e_2/sqrt(T-1), so
      X^T X = c^2 I_2 (on the first two coordinates); q = e_1,
      k = (sqrt(T-1) e_1 - e_2)/sqrt(T).
    - ``"orthogonal"`` (d >= T): X = c [I_T 0], q = e_i,
      k = (e_i - 1/T)/``||e_i - 1/T||`` on the first T coordinates.

    With d = 1 and T >= 2 no instance attains the bound unless sigma * sigma_x = 0 (README,
    "Tightness"), so ``dim`` must be >= 2 then.

    Parameters
    ----------
    sigma : float
        >= 0, the spectral norm of W_K W_Q^T.
    seq_len : int
        T >= 1.
    dim : int, optional
        The token dimension d: >= 2 (>= 1 when T = 1); default T. Memory is T x d, so for
        long sequences pass a small ``dim`` (2 suffices).
    row : int, default 0
        The query row i that attains the bound, 0 <= i < T.
    token_norm : float, default 1.0
        c >= 0, the norm of token i (and the spectral norm of X).
    construction : {"auto", "planar", "orthogonal"}, default "auto"
        "auto" is "orthogonal" when d >= T (the instances of earlier versions) and
        "planar" otherwise; "orthogonal" needs d >= T.

    Returns
    -------
    X : numpy.ndarray, shape (T, d)
    W_Q, W_K : numpy.ndarray, shape (d, 1)

    Raises
    ------
    TypeError
        ``sigma``/``token_norm`` not a real number (strings, bytes, ``Decimal``, complex,
        ``None``, bools, arrays of more than one element), non-integer
        ``seq_len``/``dim``/``row``.
    ValueError
        Negative or non-finite ``sigma``/``token_norm`` (an integer beyond float64 is not
        finite), ``seq_len`` < 1, ``row`` out of range, ``dim`` too small for the
        construction, unknown ``construction``, or ``seq_len * dim`` above
        ``theory.bound.MAX_ELEMENTS`` (2**27 entries of X, 1 GiB).

    Examples
    --------
    >>> from theory.bound import entropy_lower_bound, softmax_entropy
    >>> X, W_Q, W_K = extremal_instance(2.0, 6, dim=8, row=4)
    >>> ent = softmax_entropy((X @ W_Q) @ (X @ W_K).T)
    >>> bool(np.isclose(ent[4], theorem_bound(X, W_Q, W_K).value, rtol=1e-12))
    True

    Two dimensions suffice for any T:

    >>> X, W_Q, W_K = extremal_instance(1.5, 1000, dim=2, row=7)
    >>> ent_row = softmax_entropy((X[7] @ W_Q) @ (X @ W_K).T)
    >>> bool(np.isclose(ent_row, entropy_lower_bound(1.5, 1000), rtol=1e-12))
    True
    """
    sigma, token_norm = _check_scalar(sigma, "sigma"), _check_scalar(token_norm, "token_norm")
    for name, v in (("seq_len", seq_len), ("row", row)) + ((("dim", dim),) if dim is not None else ()):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    if not isinstance(construction, str) or construction not in ("auto", "planar", "orthogonal"):
        raise ValueError(f"construction must be 'auto', 'planar' or 'orthogonal', "
                         f"got {construction!r}")
    T = int(seq_len)
    if T < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    d = T if dim is None else int(dim)
    if d < min(T, 2) or d < 1:
        raise ValueError(f"dim must be >= 2 when seq_len >= 2 (with d = 1 no instance attains "
                         f"the bound unless sigma * sigma_x = 0), got {dim}")
    if construction == "orthogonal" and d < T:
        raise ValueError(f"dim must be >= seq_len={T} for the orthogonal construction, got {dim}")
    if not 0 <= row < T:
        raise ValueError(f"row must satisfy 0 <= row < seq_len={T}, got {row}")
    if T * d > MAX_ELEMENTS:
        hint = "; pass a small dim (2 suffices)" if 2 * T <= MAX_ELEMENTS else ""
        raise ValueError(f"seq_len={T} x dim={d} entries of X exceed MAX_ELEMENTS={MAX_ELEMENTS} "
                         f"(1 GiB of float64){hint}")
    if construction == "auto":
        construction = "orthogonal" if d >= T else "planar"
    c, root = float(token_norm), np.sqrt(float(sigma))
    X = np.zeros((T, d))
    W_Q = np.zeros((d, 1))
    k = np.zeros(d)
    if T == 1:                                  # one key: every row is one-hot, entropy 0 = h_1
        X[0, 0], W_Q[0, 0], k[0] = c, root, 1.0
    elif construction == "planar":
        X[:, 1] = c / np.sqrt(T - 1.0)          # the other tokens: c e_2 / sqrt(T-1)
        X[row] = 0.0
        X[row, 0] = c                           # token i: c e_1
        W_Q[0, 0] = root                        # q = e_1
        k[0], k[1] = np.sqrt((T - 1.0) / T), -np.sqrt(1.0 / T)
    else:
        X[np.arange(T), np.arange(T)] = c
        W_Q[row, 0] = root                      # q = e_i
        k[:T] = -1.0 / T
        k[row] += 1.0
        k /= np.linalg.norm(k)
    W_K = (root * k)[:, None]
    return X, W_Q, W_K
