"""Numerical certification of the entropy bound: high precision, global search, the box pitfall.

Everything here is a numerical *twin* of a closed form in ``theory/README.md``:

- :func:`entropy_lower_bound_mp` evaluates h_T(s) of eq. (2) with mpmath at any precision
  (the reference the tests and the committed reference data are checked against);

References are to the equation numbers of ``theory/README.md``.
"""
from __future__ import annotations

import mpmath
import numpy as np

__all__ = ["entropy_lower_bound_mp"]


def _check_seq_len_mp(seq_len):
    arr = np.asarray(seq_len)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr))
                and np.all(arr == np.round(arr))):
            raise TypeError(f"seq_len must be an integer (or integer array), got {seq_len!r}")
    if np.any(arr < 1):
        raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
    return arr.astype(np.int64)


def _h_mp(s, t):
    """h_T(s) of eq. (2) at the current mpmath precision (s: mpf >= 0, t: int >= 1)."""
    if t == 1:
        return mpmath.mpf(0)  # a single visible key: the row is one-hot, entropy 0
    g = s * mpmath.sqrt(mpmath.mpf(t) / (t - 1))
    a = (t - 1) * mpmath.exp(-g)
    return mpmath.log1p(a) + g * a / (1 + a)


def entropy_lower_bound_mp(logit_norm, seq_len, dps=50):
    r"""High-precision h_T(s), the closed form of the entropy lower bound, eq. (2).

    .. math::

        h_T(s) = \log(1 + a) + \frac{g\,a}{1 + a},\qquad
        g = s\sqrt{T/(T-1)},\quad a = (T-1)e^{-g},

    evaluated with mpmath at ``dps`` decimal digits (``h_1 = 0``: one key, one-hot row).
    This is the right-hand side of Theorem 3.1, eq. (1), with the logit norm ``s``.

    Parameters
    ----------
    logit_norm : float, str, mpmath.mpf or array_like
        s >= 0, the bound on the centred logit norm. Strings and mpf are taken exactly
        (e.g. ``"0.1"`` is 1/10 to ``dps`` digits, whereas the float 0.1 is its binary value).
    seq_len : int or array_like of int
        T >= 1, the number of visible keys. Broadcast against ``logit_norm``.
    dps : int, default 50
        Decimal digits of working precision.

    Returns
    -------
    mpmath.mpf or numpy.ndarray of object
        An ``mpf`` when both inputs are scalars; otherwise a numpy array of dtype ``object``
        holding ``mpf`` values, with the broadcast shape of the inputs (convert with
        ``.astype(float)`` for float64). The ``mpf`` values carry ``dps`` digits, but
        arithmetic on them later uses the then-current ``mpmath.mp.dps``.

    Examples
    --------
    At s = 0 the bound is log T; it decreases in s (eq. (2)):

    >>> h = entropy_lower_bound_mp([0, 1, 8], 10, dps=30)
    >>> with mpmath.workdps(30):
    ...     bool(abs(h[0] - mpmath.log(10)) < mpmath.mpf("1e-28"))
    True
    >>> bool(h[0] > h[1] > h[2])
    True
    """
    if isinstance(dps, bool) or not isinstance(dps, (int, np.integer)) or dps < 1:
        raise ValueError(f"dps must be a positive integer, got {dps!r}")
    scalar = np.ndim(logit_norm) == 0 and np.ndim(seq_len) == 0
    t_arr = _check_seq_len_mp(seq_len)
    s_obj = np.asarray(logit_norm, dtype=object)
    with mpmath.workdps(int(dps)):
        def to_mpf(x):
            if isinstance(x, (bool, np.bool_)):
                raise TypeError(f"logit_norm must be real, got {x!r}")
            try:
                v = mpmath.mpf(x.item() if isinstance(x, np.generic) else x)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"logit_norm must be real, got {x!r}") from exc
            if not mpmath.isfinite(v) or v < 0:
                raise ValueError(f"logit_norm must be finite and >= 0, got {x!r}")
            return v

        s_mp = np.vectorize(to_mpf, otypes=[object])(s_obj) if s_obj.size else s_obj
        s_b, t_b = np.broadcast_arrays(s_mp, t_arr)
        out = np.empty(s_b.shape, dtype=object)
        for idx in np.ndindex(s_b.shape):
            out[idx] = _h_mp(s_b[idx], int(t_b[idx]))
    if scalar:
        return out[()]
    return out
