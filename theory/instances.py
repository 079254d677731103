"""The bound for concrete attention instances (X, W_Q, W_K): Theorem 3.1 and its sharper variants.

Convention (``theory/README.md``, Notation): logits a = (X W_Q)(X W_K)^T * scale, row i is
query i over the keys; X is (T, d), W_Q and W_K are (d, n).

- :func:`theorem_bound` -- the paper's number h_T(sigma * sigma_x), eq. (1);
- :func:`row_logit_norm_bounds` / :func:`row_entropy_bounds` -- per-row upper bounds s_i on
  the centred logit norm and the entropy bounds h_{T_i}(s_i) for the four variants of
  eq. (7), ordered theorem <= per_query <= centered <= exact, causal or not;
- :func:`extremal_instance` -- the construction that attains eq. (1) with equality.

numpy only; float64 throughout.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from theory.bound import entropy_lower_bound

__all__ = ["TheoremBound", "theorem_bound", "row_logit_norm_bounds", "row_entropy_bounds",
           "extremal_instance", "VARIANTS"]

#: the variants of eq. (7), weakest (smallest entropy bound) first
VARIANTS = ("theorem", "per_query", "centered", "exact")


class TheoremBound(NamedTuple):
    """The paper's bound for one instance, eq. (1).

    Attributes
    ----------
    value : float
        h_T(sigma * sigma_x) in nats: every row's entropy is at least this.
    sigma : float
        ``||W_K W_Q^T||_2 * |scale|``.
    sigma_x : float
        ``||X X^T||_2 = ||X||_2^2``.
    logit_norm : float
        sigma * sigma_x, the bound on every row's logit norm, eq. (3).
    """

    value: float
    sigma: float
    sigma_x: float
    logit_norm: float


# ----------------------------------------------------------------------------- validation
def _real_matrix(x, name):
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
    if isinstance(scale, (bool, np.bool_)) or np.ndim(scale) != 0:
        raise TypeError(f"scale must be a real scalar, got {scale!r}")
    try:
        scale = float(scale)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"scale must be a real scalar, got {scale!r}") from exc
    if not np.isfinite(scale):
        raise ValueError("scale must be finite")
    return X, W_Q, W_K, scale


def _spectral_norm(m):
    """``||m||_2`` (0 for an empty matrix)."""
    return float(np.linalg.norm(m, 2)) if m.size else 0.0


# --------------------------------------------------------------------------- theorem 3.1
def theorem_bound(X, W_Q, W_K, *, scale=1.0):
    r"""The paper's entropy lower bound for one attention instance, Theorem 3.1, eq. (1).

    .. math::

        \sigma = \lVert W_K W_Q^\top\rVert_2\,|\mathrm{scale}|,\quad
        \sigma_x = \lVert X X^\top\rVert_2 = \lVert X\rVert_2^2,\quad
        \operatorname{Ent}(A_i) \ge h_T(\sigma\sigma_x)\ \text{for every row } i,

    with h_T of eq. (2) and the logit-norm chain of eq. (3).

    Parameters
    ----------
    X : array_like, shape (T, d)
        Tokens (any real dtype; computed in float64).
    W_Q, W_K : array_like, shape (d, n)
        Query and key maps.
    scale : float, default 1.0
        Logit scale (e.g. 1/sqrt(n)); its absolute value multiplies sigma.

    Returns
    -------
    TheoremBound
        ``(value, sigma, sigma_x, logit_norm)`` as Python floats.

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
    """
    X, W_Q, W_K, scale = _check_instance(X, W_Q, W_K, scale)
    sigma = _spectral_norm(W_K @ W_Q.T) * abs(scale)
    sigma_x = _spectral_norm(X) ** 2
    s = sigma * sigma_x
    return TheoremBound(float(entropy_lower_bound(s, X.shape[0])), sigma, sigma_x, s)


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
    itself. Each is valid because a_i - mean(a_i) = scale * P X_i W_K W_Q^T x_i.

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

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> X, W_Q, W_K = rng.normal(size=(5, 3)), rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    >>> s = row_logit_norm_bounds(X, W_Q, W_K, causal=True)
    >>> bool(np.all(s["theorem"] >= s["per_query"]) and np.all(s["per_query"] >= s["centered"])
    ...      and np.all(s["centered"] >= s["exact"] * (1 - 1e-12)))
    True
    """
    X, W_Q, W_K, scale = _check_instance(X, W_Q, W_K, scale)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    T = X.shape[0]
    sigma = _spectral_norm(W_K @ W_Q.T) * abs(scale)
    token_norms = np.linalg.norm(X, axis=1)                       # (T,)
    logits = scale * (X @ W_Q) @ (X @ W_K).T                      # (T, T): row i over keys
    theorem = np.full(T, sigma * _spectral_norm(X) ** 2)
    if causal:
        prefix = np.empty(T)
        prefix_centred = np.empty(T)
        exact = np.empty(T)
        for i in range(T):
            Xi = X[: i + 1]                                       # (i+1, d) visible keys
            prefix[i] = _spectral_norm(Xi)
            prefix_centred[i] = _spectral_norm(Xi - Xi.mean(axis=0))
            ai = logits[i, : i + 1]
            exact[i] = np.linalg.norm(ai - ai.mean())
    else:
        prefix = np.full(T, _spectral_norm(X))
        prefix_centred = np.full(T, _spectral_norm(X - X.mean(axis=0)))
        exact = np.linalg.norm(logits - logits.mean(axis=1, keepdims=True), axis=1)
    return {
        "theorem": theorem,
        "per_query": sigma * token_norms * prefix,
        "centered": sigma * token_norms * prefix_centred,
        "exact": exact,
    }


def row_entropy_bounds(X, W_Q, W_K, *, scale=1.0, causal=False):
    r"""Per-row entropy lower bounds h_{T_i}(s_i) for the variants of eq. (7).

    ``s_i`` from :func:`row_logit_norm_bounds`; T_i = T, or i+1 when ``causal``; h of eq. (2).
    Every variant is a valid lower bound of row i's entropy, and since h is decreasing in s
    they are ordered theorem <= per_query <= centered <= exact; "exact" is attained by some
    row with that centred norm (eq. (5)).

    Parameters
    ----------
    X, W_Q, W_K, scale, causal
        As in :func:`row_logit_norm_bounds`.

    Returns
    -------
    dict of str to numpy.ndarray
        Same keys as :func:`row_logit_norm_bounds`, float64 arrays of shape (T,), in nats.

    Examples
    --------
    >>> from theory.bound import softmax_entropy
    >>> rng = np.random.default_rng(2)
    >>> X, W_Q, W_K = rng.normal(size=(8, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    >>> hb = row_entropy_bounds(X, W_Q, W_K, scale=0.5)
    >>> ent = softmax_entropy(0.5 * (X @ W_Q) @ (X @ W_K).T)
    >>> bool(np.all(ent >= hb["exact"] * (1 - 1e-9)) and np.all(hb["exact"] >= hb["theorem"]))
    True
    """
    norms = row_logit_norm_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    T = len(norms["exact"])
    seq = np.arange(1, T + 1, dtype=np.float64) if causal else float(T)
    return {k: np.asarray(entropy_lower_bound(v, seq), dtype=np.float64).reshape(T)
            for k, v in norms.items()}


# --------------------------------------------------------------------------- tightness
def extremal_instance(sigma, seq_len, dim=None, *, row=0, token_norm=1.0):
    r"""An instance (X, W_Q, W_K) whose row ``row`` attains Theorem 3.1 with equality.

    Orthogonal tokens of equal norm c and rank-one maps (``theory/README.md``, eq. (5)):

    .. math::

        X = c\,[I_T\;0],\quad W_Q = \sqrt{\sigma}\,e_i,\quad W_K = \sqrt{\sigma}\,u,\quad
        u = \frac{e_i - \mathbf 1/T}{\lVert e_i - \mathbf 1/T\rVert},

    so ``||W_K W_Q^T||_2 = sigma``, sigma_x = c^2 and a_i = c^2 sigma u^T: centred, of norm
    sigma * sigma_x, with the extremal shape of eq. (5) (the query attends to itself). Its
    entropy is h_T(sigma c^2) = ``theorem_bound(X, W_Q, W_K).value``.

    Parameters
    ----------
    sigma : float
        >= 0, the spectral norm of W_K W_Q^T.
    seq_len : int
        T >= 1.
    dim : int, optional
        d >= T (default T): orthogonal tokens need T dimensions.
    row : int, default 0
        The query row i that attains the bound, 0 <= i < T.
    token_norm : float, default 1.0
        c >= 0, the norm of every token.

    Returns
    -------
    X : numpy.ndarray, shape (T, d)
    W_Q, W_K : numpy.ndarray, shape (d, 1)

    Examples
    --------
    >>> from theory.bound import softmax_entropy
    >>> X, W_Q, W_K = extremal_instance(2.0, 6, dim=8, row=4)
    >>> ent = softmax_entropy((X @ W_Q) @ (X @ W_K).T)
    >>> bool(np.isclose(ent[4], theorem_bound(X, W_Q, W_K).value, rtol=1e-12))
    True
    """
    for name, v in (("sigma", sigma), ("token_norm", token_norm)):
        if isinstance(v, (bool, np.bool_)) or np.ndim(v) != 0:
            raise TypeError(f"{name} must be a real scalar, got {v!r}")
        if not np.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    for name, v in (("seq_len", seq_len), ("row", row)) + ((("dim", dim),) if dim is not None else ()):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    T = int(seq_len)
    if T < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    d = T if dim is None else int(dim)
    if d < T:
        raise ValueError(f"dim must be >= seq_len={T} (orthogonal tokens), got {dim}")
    if not 0 <= row < T:
        raise ValueError(f"row must satisfy 0 <= row < seq_len={T}, got {row}")
    c, root = float(token_norm), np.sqrt(float(sigma))
    X = np.zeros((T, d))
    X[np.arange(T), np.arange(T)] = c
    u = np.zeros(d)
    if T == 1:
        u[0] = 1.0                              # one key: every row is one-hot, entropy 0 = h_1
    else:
        u[:T] = -1.0 / T
        u[row] += 1.0
        u /= np.linalg.norm(u)
    W_Q = np.zeros((d, 1))
    W_Q[row, 0] = root
    W_K = (root * u)[:, None]
    return X, W_Q, W_K
