"""The attention-entropy lower bound h_T(s) of Theorem 3.1, its inverse and its extremal row.

Equation numbers refer to ``theory/README.md``:

- :func:`softmax_entropy` -- the entropy of softmax(z) in nats, computed stably;
- :func:`entropy_lower_bound` -- h_T(s), eq. (2): the least entropy of softmax(z) over all
  z in R^T with centred norm ``||z - mean(z)|| <= s``;
- :func:`max_logit_norm` -- its inverse, eq. (10);
- :func:`extremal_logits` -- the row z* of eq. (5) that attains h_T(s).

numpy only; float64 throughout.
"""
from __future__ import annotations

import operator

import numpy as np
from scipy.optimize import elementwise as _elementwise

__all__ = ["softmax_entropy", "entropy_lower_bound", "max_logit_norm", "extremal_logits"]

#: elements per chunk in :func:`entropy_lower_bound`: four float64 scratch buffers of this
#: length (4 x 64 KiB) stay in a core's L2 cache, so the chain of in-place ufuncs streams
#: each input from memory once instead of materialising ~10 full-size temporaries.
_CHUNK = 8192

#: the most float64 elements (2**27, 1 GiB) that :func:`extremal_logits` and
#: :func:`theory.instances.extremal_instance` allocate; larger requests raise ``ValueError``
#: up front instead of a ``MemoryError`` or a silent multi-gigabyte allocation.
MAX_ELEMENTS = 2**27


# ----------------------------------------------------------------------------- validation
def _real_array(x, name):
    """``x`` as an array of a real dtype (not converted); ``TypeError`` otherwise.

    Strings, bytes and bools are rejected. Python integers beyond the int64 range (numpy
    makes them an ``object`` array) are accepted like their float64 value; one too large
    even for float64 is a ``ValueError`` (not finite).
    """
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a real number or array of real numbers, got {x!r}")
    arr = np.asarray(x)
    if arr.dtype == object:
        arr = _object_to_float(arr, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real number or array of real numbers, "
                        f"got dtype {arr.dtype}")
    return arr


def _object_to_float(arr, name):
    """An object array of Python/numpy reals (e.g. ints beyond int64) as float64."""
    flat = arr.reshape(-1)
    for v in flat:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer,
                                                                  np.floating)):
            raise TypeError(f"{name} must be a real number or array of real numbers, "
                            f"got an element {v!r}")
    try:
        return np.array([float(v) for v in flat], dtype=np.float64).reshape(arr.shape)
    except OverflowError:
        raise ValueError(f"{name} must be finite (an integer too large for float64)") from None


def _check_range(arr, name, lowest):
    """Finite and >= lowest, by two reductions (no temporaries): nan propagates into min."""
    if arr.size and not (arr.min() >= lowest and np.isfinite(arr.max())):
        raise ValueError(f"{name} must be finite and >= {lowest}")


def _as_real_array(x, name):
    """``x`` as a float64 array; ``TypeError`` for non-real input, ``ValueError`` for nan/inf."""
    arr = _real_array(x, name).astype(np.float64, copy=False)
    # min and max tested apart: their sum overflows for finite values near the float64 limit
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise ValueError(f"{name} must be finite")
    return arr


def _check_norm(x, name="logit_norm"):
    arr = _real_array(x, name).astype(np.float64, copy=False)
    _check_range(arr, name, 0)
    return arr


def _check_seq_len(x, name="seq_len", integer_check=True):
    """T >= 1, integer-valued; integer arrays are returned unconverted (cast per chunk)."""
    arr = _real_array(x, name)
    _check_range(arr, name, 1)
    if np.issubdtype(arr.dtype, np.integer):
        return arr if arr.ndim else arr.astype(np.float64)
    arr = arr.astype(np.float64, copy=False)
    if integer_check and not _is_integral(arr):
        raise ValueError(f"{name} must be integer-valued (a number of keys)")
    return arr


def _is_integral(arr):
    return bool(np.all(np.floor(arr) == arr))


def _check_axis(axis):
    """``axis`` as a Python int (``operator.index``); ``TypeError`` naming it otherwise."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {axis!r}") from None


def _broadcast_shape(a, b, name_a, name_b):
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{name_a} of shape {a.shape} and {name_b} of shape {b.shape} "
                         f"do not broadcast") from None


# ------------------------------------------------------------------------- softmax entropy
def softmax_entropy(logits, axis=-1):
    r"""Entropy in nats of softmax(z) along ``axis``, computed stably.

    With m = max_j z_j, y = z - m, e_j = exp(y_j) and R = sum over the non-maximal keys of e_j,

    .. math::

        \operatorname{Ent}(\operatorname{softmax}(z)) = \log(1 + R)
            + \frac{\sum_j e_j\,(-y_j)}{1 + R},

    a sum of two non-negative terms (no cancellation; ``log1p`` keeps nearly one-hot rows
    exact). This is the left-hand side of Theorem 3.1, eq. (1); it is shift invariant,
    eq. (4). A key with logit ``-inf`` is masked: it gets probability 0 and contributes 0.

    Parameters
    ----------
    logits : array_like
        Real logits (any float or integer dtype; computed in float64). ``-inf`` marks a
        masked key; ``nan`` and ``+inf`` are rejected.
    axis : int, default -1
        The axis over the keys.

    Returns
    -------
    numpy.ndarray or numpy.float64
        The entropies, with ``axis`` removed.

    Raises
    ------
    TypeError
        If ``logits`` is not real (strings, bools, complex) or ``axis`` is not an integer.
    ValueError
        If ``logits`` holds ``nan``/``+inf``, is 0-dimensional, ``axis`` is out of range, the
        key axis is empty, or a row has every key masked. An empty batch (e.g. shape
        ``(0, T)``) gives an empty result.

    Examples
    --------
    Uniform rows have entropy log T; adding a constant changes nothing (eq. (4)):

    >>> z = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 0.5, -np.inf]])
    >>> h = softmax_entropy(z)
    >>> bool(np.isclose(h[0], np.log(4)))
    True
    >>> bool(np.allclose(softmax_entropy(z + 7.0), h))
    True
    """
    z = _real_array(logits, "logits").astype(np.float64, copy=False)
    axis = _check_axis(axis)
    if z.ndim == 0:
        raise ValueError("logits must have at least one dimension (the keys)")
    try:
        z = np.moveaxis(z, axis, -1)
    except (ValueError, IndexError) as exc:           # numpy AxisError subclasses both
        raise ValueError(f"axis {axis} is out of range for logits of shape {z.shape}") from exc
    if z.shape[-1] == 0:
        raise ValueError("logits has no keys along axis")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits must not contain nan or +inf (use -inf to mask a key)")
    m = z.max(axis=-1, keepdims=True)
    if np.isneginf(m).any():
        raise ValueError("logits has a row with every key masked (-inf); its softmax is undefined")
    # >= 0; +inf at masked keys, and where the range exceeds the float64 range (that key's
    # probability is 0 either way: e^-inf = 0)
    with np.errstate(over="ignore"):
        neg_y = m - z
    with np.errstate(under="ignore"):                 # far-below-max keys: p underflows to 0
        e = np.exp(-neg_y)                            # 0 at masked keys, 1 at the max
    # R = sum of e over all keys but one maximal key (that key contributes exactly 1)
    top = np.argmax(z, axis=-1)[..., None]
    np.put_along_axis(e, top, 0.0, axis=-1)
    rest = e.sum(axis=-1)
    with np.errstate(under="ignore"):
        weighted = np.multiply(e, neg_y, out=np.zeros_like(e), where=e > 0).sum(axis=-1)
        return np.log1p(rest) + weighted / (1.0 + rest)


# -------------------------------------------------------------------------------- h_T(s)
def _h_chunk(s, t, out, b1, b2, b3):
    """h_T(s) of eq. (2) for 1-d chunks ``s``, ``t`` (T >= 2) into ``out``; b1..b3 scratch."""
    np.subtract(t, 1.0, out=b1)                       # T - 1
    np.divide(t, b1, out=b2)
    np.sqrt(b2, out=b2)
    np.multiply(b2, s, out=b2)                        # g = s sqrt(T / (T-1))
    np.log(b1, out=b3)
    np.subtract(b3, b2, out=b3)
    np.exp(b3, out=b3)                                # a = exp(log(T-1) - g): no underflow of e^-g
    np.log1p(b3, out=out)                             # log(1 + a), exact for tiny a
    np.add(b3, 1.0, out=b1)
    np.divide(b3, b1, out=b3)
    np.multiply(b3, b2, out=b3, where=b3 > 0)         # g a / (1 + a); 0 where a = 0 (g = inf)
    np.add(out, b3, out=out)


def _h_chunk_scalar_t(s, log_tm1, c, out, b1, b2, b3):
    """As :func:`_h_chunk` with a scalar T: c = sqrt(T/(T-1)) and log(T-1) precomputed."""
    np.multiply(s, c, out=b2)                         # g
    np.subtract(log_tm1, b2, out=b1)
    np.exp(b1, out=b1)                                # a
    np.log1p(b1, out=out)
    np.add(b1, 1.0, out=b3)
    np.divide(b1, b3, out=b1)
    np.multiply(b1, b2, out=b1, where=b1 > 0)         # g a / (1 + a); 0 where a = 0 (g = inf)
    np.add(out, b1, out=out)


def entropy_lower_bound(logit_norm, seq_len, *, rounding="nearest"):
    r"""h_T(s): the least entropy of softmax(z) over z in R^T with ``||z - mean(z)||_2 <= s``.

    The closed form of Theorem 3.1, eq. (2): with :math:`g = s\sqrt{T/(T-1)}` and
    :math:`a = (T-1)e^{-g}`,

    .. math::

        h_T(s) = \log(1 + a) + \frac{g\,a}{1 + a}, \qquad h_1(s) = 0 .

    Evaluated as ``log1p(a) + g*a/(1+a)`` with ``a = exp(log(T-1) - g)``: both terms are
    non-negative (no cancellation), ``log1p`` is exact for tiny ``a``, and forming ``a`` from
    one exponent avoids the underflow of ``e^{-g}`` when ``T`` is large. Relative error
    <= 1e-12 against 50-digit mpmath for s in [0, 1e4], T in [2, 1e12] wherever the value is a
    normal float64 (``tests/test_bound.py``). Inputs are processed in cache-sized chunks
    with in-place ufuncs (``benchmarks/bench_bound.py``).

    Parameters
    ----------
    logit_norm : float or array_like
        s >= 0, an upper bound on the centred logit norm (eqs. (3), (4)).
    seq_len : int or array_like
        T >= 1, integer-valued: the number of keys. Broadcast against ``logit_norm``.
    rounding : {"nearest", "down"}, default "nearest"
        "nearest": h_T(s) to within its error bound (below). "down": that value times
        ``1 - 4 eps (log(T-1) + g + 4)``, and 0 below the smallest normal float64 or where
        e^-g is (g > 708.4: the row's probabilities are subnormal, short of digits): never
        above the exact h_T(s), and never above the entropy :func:`softmax_entropy` measures
        for :func:`extremal_logits` (s, T) (``tests/test_bound.py``). Use it when the value is
        compared with measured entropies as a bound.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        h_T(s) in nats, float64, with the broadcast shape; ``log T`` at s = 0, ``0`` at T = 1,
        decreasing in s and increasing in T.

    Raises
    ------
    TypeError
        Non-real input (strings, bools, complex, other objects); ``rounding`` not a string.
    ValueError
        Negative, non-finite, or non-broadcasting input; ``seq_len`` < 1 or not an integer;
        ``rounding`` not "nearest" or "down". Empty arrays are checked like any other and give
        an empty result.

    Notes
    -----
    By default this is the value of h_T(s) rounded to about the nearest float64: at most
    ``4 eps (log(T-1) + g + 4)`` relative error where the result is a normal float64
    (``tests/test_bound.py``). ``rounding="down"`` subtracts that bound. The functions that
    bound concrete rows
    (:func:`theory.instances.theorem_bound`, :func:`theory.instances.row_entropy_bounds`) and
    :func:`max_logit_norm` round outward from it. Integers beyond int64 are taken as their
    float64 value.

    Examples
    --------
    >>> h = entropy_lower_bound([0.0, 1.0, 10.0], 16)
    >>> bool(np.isclose(h[0], np.log(16)))
    True
    >>> bool(h[0] > h[1] > h[2] > 0)
    True
    >>> float(entropy_lower_bound(3.0, 1))
    0.0
    """
    if not isinstance(rounding, str):
        raise TypeError(f"rounding must be 'nearest' or 'down', got {rounding!r}")
    if rounding not in ("nearest", "down"):
        raise ValueError(f"rounding must be 'nearest' or 'down', got {rounding!r}")
    s = _check_norm(logit_norm, "logit_norm")
    t = _check_seq_len(seq_len, "seq_len", integer_check=False)   # checked chunk by chunk
    shape = _broadcast_shape(s, t, "logit_norm", "seq_len")
    out = np.empty(shape, dtype=np.float64)
    if out.size == 0:
        if t.size and not _is_integral(t):            # empty input is validated like any other
            raise ValueError("seq_len must be integer-valued (a number of keys)")
        return out
    _h_into(s, t, shape, out)
    if rounding == "down":
        _round_down(out, s, t)
    return out[()]


#: beyond this gap e^-g is below the smallest normal float64: the probabilities of the extremal
#: row (and a, when T is small) are subnormal and carry fewer than 53 bits, both in h and in any
#: measured entropy, so a rounded-down bound is 0 there
_G_SUBNORMAL = float(-np.log(np.finfo(np.float64).tiny))      # 708.396...


def _round_down(h, s, t):
    """h (in place) times 1 - its error bound; 0 below the smallest normal float64 and where
    e^-g is subnormal (g > 708.4)."""
    tf = np.broadcast_to(np.asarray(t, dtype=np.float64), h.shape)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        g = np.broadcast_to(s, h.shape) * np.sqrt(tf / np.maximum(tf - 1.0, 1.0))
        err = _h_error_bound(np.where(np.isfinite(g), g, 0.0), tf)
        h *= 1.0 - err
    h[(h < np.finfo(np.float64).tiny) | ~(g <= _G_SUBNORMAL)] = 0.0


def _h_into(s, t, shape, out):
    """h_T(s) into ``out``; s may be +inf here (h = 0), used by theory.instances."""
    # a = (T-1) e^{-g} may underflow to 0 by design (h then underflows towards 0 too); g may
    # overflow to inf for s near the float64 maximum (then a = 0 and h = 0)
    with np.errstate(under="ignore", over="ignore"):
        _fill_h(s, t, shape, out)


def _fill_h(s, t, shape, out):
    """The chunked evaluation of eq. (2) for :func:`entropy_lower_bound`, into ``out``."""
    if t.ndim == 0 or t.size == 1:
        tv = float(t.reshape(-1)[0])
        if tv != np.floor(tv):
            raise ValueError("seq_len must be integer-valued (a number of keys)")
        if tv == 1.0:
            out.fill(0.0)
            return
        c = np.sqrt(tv / (tv - 1.0))
        log_tm1 = np.log(tv - 1.0)
        s_flat = np.broadcast_to(s, shape).reshape(-1)    # a view when s already has `shape`
        out_flat = out.reshape(-1)
        n = min(_CHUNK, out.size)
        b1, b2, b3 = np.empty(n), np.empty(n), np.empty(n)
        for lo in range(0, out.size, _CHUNK):
            hi = min(lo + _CHUNK, out.size)
            k = hi - lo
            _h_chunk_scalar_t(s_flat[lo:hi], log_tm1, c, out_flat[lo:hi], b1[:k], b2[:k],
                              b3[:k])
        return
    n = min(_CHUNK, out.size)
    b1, b2, b3 = np.empty(n), np.empty(n), np.empty(n)
    integral = np.issubdtype(t.dtype, np.integer)
    it = np.nditer([s, t, out], flags=["external_loop", "buffered", "zerosize_ok"],
                   op_flags=[["readonly"], ["readonly"], ["writeonly"]],
                   op_dtypes=[np.float64, np.float64, np.float64], casting="safe",
                   buffersize=_CHUNK)
    with it:
        for s_c, t_c, o_c in it:
            k = o_c.shape[0]
            if not integral and not np.array_equal(np.floor(t_c, out=b1[:k]), t_c):
                raise ValueError("seq_len must be integer-valued (a number of keys)")
            one = t_c == 1.0
            if one.any():                             # h_1 = 0; keep T = 1 out of log(T-1)
                t_c = np.where(one, 2.0, t_c)
                _h_chunk(s_c, t_c, o_c, b1[:k], b2[:k], b3[:k])
                o_c[one] = 0.0
            else:
                _h_chunk(s_c, t_c, o_c, b1[:k], b2[:k], b3[:k])


# -------------------------------------------------------------------------- the inverse
def _log_h_of_g(g, log_tm1):
    """log h as a function of the gap g, eq. (2), finite for every g >= 0 (no underflow).

    log h = log a + log(log1p(a)/a + g/(1+a)),  log a = log(T-1) - g.
    """
    log_a = log_tm1 - g
    with np.errstate(under="ignore"):                 # a, 0.5 a may underflow (a tiny or 0)
        a = np.exp(log_a)
        tiny = a < 1e-8
        ratio = np.where(tiny, 1.0 - 0.5 * a, np.log1p(a) / np.where(tiny, 1.0, a))
        return log_a + np.log(ratio + g / (1.0 + a))


def _h_error_bound(g, t):
    """Relative error bound of :func:`entropy_lower_bound` at gap g (float64, T >= 2).

    ``4 eps (log(T-1) + g + 4)``: forming g costs a few ulp, and ``a = exp(log(T-1) - g)``
    turns the absolute error of its argument into a relative one; 3x the largest error seen
    against 50-digit mpmath on the reference grid (``tests/test_bound.py``).
    """
    return 4.0 * np.finfo(np.float64).eps * (np.log(np.maximum(t - 1.0, 1.0)) + g + 4.0)


def max_logit_norm(entropy, seq_len):
    r"""Inverse of :func:`entropy_lower_bound` in s, eq. (10), rounded to the safe side.

    The largest s such that every row z in R^T with ``||z - mean(z)|| <= s`` has
    ``Ent(softmax(z)) >= entropy``: the unique root of h_T(s) = H (h_T is strictly decreasing
    from log T to 0, eq. (2)). ``inf`` when H = 0 (every row qualifies), ``0`` when
    H = log T. Solved for the gap g = s sqrt(T/(T-1)) on log h (eq. (2)) with Chandrupatla's
    bracketing method (:func:`scipy.optimize.elementwise.find_root`), vectorized, in the
    bracket [0, max(2L, 3)] with L = log(T-1) - log H, which holds the root because
    h <= a(1+g) and g - log(1+g) >= g/2 for g >= 3.

    The result is conservative: it is the root for ``H (1 + e)``, with ``e`` the relative
    error bound ``4 eps (log(T-1) + g + 4)`` of the float64 evaluation of h_T, and is then
    lowered ulp by ulp until ``entropy_lower_bound(s, T) >= H (1 + e)``. So the exact h_T(s)
    (checked against 50-digit mpmath in ``tests/test_bound.py``) is >= H: every row within
    that norm really has entropy >= H. The price is a relative shortfall of about
    ``e / |d log h / d log s|`` against the exact inverse (about 1e-12 away from H = log T).

    Parameters
    ----------
    entropy : float or array_like
        H in [0, log T], nats. H above log T by at most 4 eps relative (rounding of log T
        computed elsewhere) is taken as log T; a positive H below the smallest normal
        float64 (2.2e-308) as that normal value (a stronger requirement).
    seq_len : int or array_like
        T >= 1, integer-valued. Broadcast against ``entropy``.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        s >= 0 (``inf`` where H = 0); an empty array for empty input.

    Raises
    ------
    TypeError
        Non-real input (strings, bools, complex, other objects).
    ValueError
        H < 0, H > log T (no row has more entropy than the uniform one), non-finite or
        non-broadcasting input, ``seq_len`` < 1 or not an integer. Empty arrays are checked
        like any other.

    Examples
    --------
    A round trip returns the entropy, from the safe side:

    >>> s = max_logit_norm([0.5, 1.0, 2.0], 64)
    >>> h = entropy_lower_bound(s, 64)
    >>> bool(np.allclose(h, [0.5, 1.0, 2.0], rtol=1e-12)) and bool(np.all(h >= [0.5, 1.0, 2.0]))
    True
    """
    h = _as_real_array(entropy, "entropy")
    t = _check_seq_len(seq_len, "seq_len")
    shape = _broadcast_shape(h, t, "entropy", "seq_len")
    h, t = np.broadcast_arrays(h, t.astype(np.float64, copy=False))
    if (h < 0).any():
        raise ValueError("entropy must be >= 0")
    log_t = np.log(t)
    # allow rounding of log T itself (H = log T computed elsewhere may exceed ours by an ulp)
    if (h > log_t * (1 + 4 * np.finfo(float).eps)).any():
        raise ValueError("entropy must be <= log(seq_len): no row of T keys has more entropy")
    out = np.empty(shape, dtype=np.float64)
    out[h == 0] = np.inf
    out[(h >= log_t) & (h > 0)] = 0.0
    todo = (h > 0) & (h < log_t)
    if todo.any():
        out[todo] = _inverse_safe(h[todo], t[todo])
    return out[()]


def _root_in_g(hv, log_tm1):
    """g with h(g) = hv (0 where h(0) <= hv), by Chandrupatla on log h; 1-d arrays."""
    log_hv = np.log(hv)
    g_hi = np.maximum(2.0 * (log_tm1 - log_hv), 3.0)

    def f(g, lt, lh):
        return _log_h_of_g(g, lt) - lh

    # H within rounding of log T: h(0) may evaluate a hair below H; the answer is 0
    inside = f(0.0, log_tm1, log_hv) > 0
    g = np.zeros_like(hv)
    if inside.any():
        res = _elementwise.find_root(
            f, (np.zeros(inside.sum()), g_hi[inside]),
            args=(log_tm1[inside], log_hv[inside]),
            tolerances=dict(xrtol=4 * np.finfo(float).eps, xatol=0.0, fatol=0.0, frtol=0.0))
        g[inside] = res.x
    return g


def _inverse_safe(hv, tv):
    """The conservative inverse for 0 < H < log T (1-d arrays, T >= 2)."""
    with np.errstate(under="ignore"):
        return _inverse_safe_impl(hv, tv)


def _inverse_safe_impl(hv, tv):
    # a subnormal H has no relative accuracy to guard: ask for the smallest normal instead
    # (a stronger requirement, so still h_T(s) >= H)
    hv = np.maximum(hv, np.finfo(np.float64).tiny)
    log_tm1 = np.log(tv - 1.0)
    c = np.sqrt(tv / (tv - 1.0))
    g0 = _root_in_g(hv, log_tm1)
    # the error bound at a gap a little beyond the root (it grows with g)
    target = hv * (1.0 + _h_error_bound(g0 + 1.0, tv))
    below = target < np.log(tv)
    s = np.zeros_like(hv)
    if below.any():
        s[below] = _root_in_g(target[below], log_tm1[below]) / c[below]
    # lower s until the float64 value, less its error bound, is >= H (a handful of steps)
    for k in range(54):
        hs = entropy_lower_bound(s, tv)
        bad = (hs < hv * (1.0 + _h_error_bound(s * c, tv))) & (s > 0)
        if not bad.any():
            break
        s[bad] *= 1.0 - 2.0 ** (k - 52)
    s[bad] = 0.0 if k == 53 else s[bad]
    return s


# ------------------------------------------------------------------------- extremal row
def extremal_logits(logit_norm, seq_len, top=0):
    r"""A logit row attaining h_T(s), eq. (5): one high key, T-1 equal low ones.

    .. math::

        z^* = g\,(e_k - \tfrac{1}{T}\mathbf 1), \qquad g = s\sqrt{T/(T-1)},

    so mean(z*) = 0, ``||z*|| = s`` and ``softmax_entropy(z*) = h_T(s)``.

    Parameters
    ----------
    logit_norm : float or array_like
        s >= 0. An array gives a batch: the result has shape ``np.shape(s) + (T,)``.
    seq_len : int
        T >= 1 (scalar: the length of the row).
    top : int, default 0
        k, the index of the high key, 0 <= k < T.

    Returns
    -------
    numpy.ndarray
        float64 logits of shape ``np.shape(logit_norm) + (seq_len,)`` (all zeros for T = 1).

    Raises
    ------
    TypeError
        Non-real ``logit_norm``/``seq_len`` (strings, bools, complex), ``top`` not an integer.
    ValueError
        Negative or non-finite ``logit_norm``, ``seq_len`` not a scalar integer >= 1, ``top``
        out of range, s so large (~1.8e308 sqrt((T-1)/T)) that a logit overflows, or a
        result of more than ``MAX_ELEMENTS`` (2**27, 1 GiB of float64) elements.

    Examples
    --------
    >>> z = extremal_logits(2.5, 8, top=3)
    >>> bool(np.isclose(np.linalg.norm(z - z.mean()), 2.5))
    True
    >>> bool(np.isclose(softmax_entropy(z), entropy_lower_bound(2.5, 8), rtol=1e-13))
    True
    """
    s = _check_norm(logit_norm, "logit_norm")
    if np.ndim(seq_len) != 0:
        raise ValueError("seq_len must be a scalar (the length of the row)")
    t = int(_check_seq_len(seq_len, "seq_len"))
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)):
        raise TypeError(f"top must be an integer, got {top!r}")
    if not 0 <= top < t:
        raise ValueError(f"top must satisfy 0 <= top < seq_len={t}, got {top}")
    if s.size * t > MAX_ELEMENTS:
        raise ValueError(f"seq_len={t} with {s.size} logit_norm value(s) asks for {s.size * t} "
                         f"logits, more than MAX_ELEMENTS={MAX_ELEMENTS} (1 GiB of float64)")
    z = np.zeros(s.shape + (t,), dtype=np.float64)
    if t == 1:
        return z
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # checked below
        g = s * np.sqrt(t / (t - 1.0))
        z[...] = -(g / t)[..., None]
        z[..., top] = g - g / t
    if not np.isfinite(z).all():
        raise ValueError("logit_norm is too large: the extremal row's logits overflow float64")
    return z
