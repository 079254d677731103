"""Numerical certification of the entropy bound: high precision, global search, the box pitfall.

Everything here is a numerical *twin* of a closed form in ``theory/README.md``:

- :func:`entropy_lower_bound_mp` evaluates h_T(s) of eq. (2) with mpmath at any precision
  (the reference the tests and the committed reference data are checked against);
- :func:`minimize_entropy` searches for the global minimum of the softmax entropy on the sphere
  ``||z - mean(z)|| = s`` from random and adversarial starts, with analytic gradients, and
  reports its gap to h_T(s): the numerical twin of step 2 of the proof, eqs. (5)-(6);
- :func:`box_min_entropy` is the exact minimum over the box ``|z_j| <= s`` (the per-token-norm
  pitfall, eq. (11)), :func:`box_min_entropy_search` its brute-force twin, and
  :func:`one_hot_counterexample` shows that the one-hot row is not the box minimiser.

References are to the equation numbers of ``theory/README.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import mpmath
import numpy as np
from scipy.linalg import null_space
from scipy.optimize import minimize

from theory.bound import entropy_lower_bound, softmax_entropy

__all__ = [
    "entropy_lower_bound_mp",
    "EntropyMinimum",
    "minimize_entropy",
    "BoxMinimum",
    "box_min_entropy",
    "box_min_entropy_search",
    "OneHotCounterexample",
    "one_hot_counterexample",
    "AdamUpdateBound",
    "adam_update_bound",
]

EPS = float(np.finfo(np.float64).eps)


def _check_seq_len_mp(seq_len):
    """An object array of Python ints >= 1 (exact, also beyond int64)."""
    if isinstance(seq_len, (str, bytes)):
        raise TypeError(f"seq_len must be an integer (or integer array), got {seq_len!r}")
    arr = np.asarray(seq_len, dtype=object)

    def to_int(x):
        if isinstance(x, (bool, np.bool_)):
            raise TypeError(f"seq_len must be an integer (or integer array), got {x!r}")
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)) and np.isfinite(x) and x == np.round(x):
            return int(x)
        raise TypeError(f"seq_len must be an integer (or integer array), got {x!r}")

    out = np.empty(arr.shape, dtype=object)
    for idx in np.ndindex(arr.shape):
        out[idx] = to_int(arr[idx])
        if out[idx] < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
    return out


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
    logit_norm : float, int, fractions.Fraction, mpmath.mpf or array_like of these
        s >= 0, the bound on the centred logit norm. Floats are taken as their exact binary
        value; a ``Fraction`` is rounded once to ``dps`` digits (``Fraction(1, 10)`` is 1/10
        to ``dps`` digits, whereas the float 0.1 is its binary value). Strings are rejected.
    seq_len : int or array_like of int
        T >= 1, the number of visible keys (exact, also beyond int64; integer-valued floats
        are accepted). Broadcast against ``logit_norm``.
    dps : int, default 50
        Decimal digits of working precision.

    Returns
    -------
    mpmath.mpf or numpy.ndarray of object
        An ``mpf`` when both inputs are scalars; otherwise a numpy array of dtype ``object``
        holding ``mpf`` values, with the broadcast shape of the inputs (convert with
        ``.astype(float)`` for float64). The ``mpf`` values carry ``dps`` digits, but
        arithmetic on them later uses the then-current ``mpmath.mp.dps``.

    Raises
    ------
    TypeError
        ``logit_norm`` not real (strings, bools, complex) or ``seq_len`` not an integer.
    ValueError
        ``logit_norm`` negative or not finite, ``seq_len`` < 1, ``dps`` not a positive integer,
        or the inputs do not broadcast.

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
    if isinstance(logit_norm, (str, bytes)):
        raise TypeError(f"logit_norm must be real, got {logit_norm!r}")
    s_obj = np.asarray(logit_norm, dtype=object)
    with mpmath.workdps(int(dps)):
        def to_mpf(x):
            if isinstance(x, np.generic) and not isinstance(x, np.bool_):
                x = x.item()
            if isinstance(x, (bool, np.bool_)) or not isinstance(
                    x, (int, float, Fraction, mpmath.mpf)):
                raise TypeError(f"logit_norm must be real, got {x!r}")
            v = mpmath.mpf(x.numerator) / x.denominator if isinstance(x, Fraction) \
                else mpmath.mpf(x)
            if not mpmath.isfinite(v) or v < 0:
                raise ValueError(f"logit_norm must be finite and >= 0, got {x!r}")
            return v

        s_mp = np.empty(s_obj.shape, dtype=object)
        for idx in np.ndindex(s_obj.shape):
            s_mp[idx] = to_mpf(s_obj[idx])
        try:
            s_b, t_b = np.broadcast_arrays(s_mp, t_arr)
        except ValueError:
            raise ValueError(f"logit_norm of shape {s_mp.shape} and seq_len of shape "
                             f"{t_arr.shape} do not broadcast") from None
        out = np.empty(s_b.shape, dtype=object)
        for idx in np.ndindex(s_b.shape):
            out[idx] = _h_mp(s_b[idx], int(t_b[idx]))
    if scalar:
        return out[()]
    return out


# ------------------------------------------------------------------ validation helpers
def _check_scalar_norm(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    try:
        x = float(x)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for float64") from None
    if not np.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {x!r}")
    return x


def _check_int(x, name, minimum, maximum=None):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {x!r}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    if maximum is not None and x > maximum:
        raise ValueError(f"{name} must be <= {maximum} here, got {x}")
    return int(x)


def _entropy_and_grad(z):
    """Softmax entropy of z and its gradient, eq. (6): dH/dz_k = -p_k (z_k - sum_j p_j z_j).

    Both to a few ulp *relative*, also for nearly one-hot rows (H ~ 1e-300): with y = z - max,
    e = exp(y), R = sum of e over the non-maximal keys, H = log1p(R) + sum(-y e)/(1 + R)
    (as :func:`theory.bound.softmax_entropy`), and z_k - E_p z = y_k - E_p y with
    E_p y = sum p_j y_j summed without cancellation (all terms <= 0).
    """
    top = int(np.argmax(z))
    y = z - z[top]
    with np.errstate(under="ignore"):
        e = np.exp(y)
    e_rest = e.copy()
    e_rest[top] = 0.0
    rest = e_rest.sum()
    denom = 1.0 + rest
    with np.errstate(under="ignore"):
        weighted = np.dot(e, -y)
        h = np.log1p(rest) + weighted / denom
        p = e / denom
        mean_y = -weighted / denom                    # E_p y <= 0
        grad = -p * (y - mean_y)
    return h, grad


# ------------------------------------------------------------ global minimisation on the sphere
@dataclass(frozen=True)
class EntropyMinimum:
    """Result of :func:`minimize_entropy`.

    Attributes
    ----------
    value : float
        The least entropy found (nats).
    logits : numpy.ndarray
        The minimiser, centred, with norm ``logit_norm``; shape ``(seq_len,)``.
    gap : float
        ``value - h_T(s)`` (eq. (2)): >= 0 up to rounding if the bound holds, ~0 if it is tight.
    bound : float
        h_T(s) from :func:`theory.bound.entropy_lower_bound`.
    start_values : numpy.ndarray
        The local minimum reached from each start (random starts first, then adversarial).
    spread : float
        How much the entropy varies over the sphere, at least: the entropy of the most
        balanced two-valued row (``max(T // 2, 2)`` high entries for T >= 3, eq. (6)) minus
        ``bound``. Where it is
        below the rounding noise of an entropy (``noise``), agreement of ``value`` with
        ``bound`` proves nothing: every point of the sphere has that entropy to rounding
        (small s, where the variation is O(s^3) (eq. (8)), and T = 2, where the sphere holds
        only the two extremal rows).
    noise : float
        ``16 eps max(value, bound)``, the rounding noise of the entropies compared here.
    """

    value: float
    logits: np.ndarray
    gap: float
    bound: float
    start_values: np.ndarray
    spread: float = np.nan
    noise: float = np.nan

    @property
    def informative(self) -> bool:
        """``spread > 100 * noise``: the search could have found something below ``bound``."""
        return bool(self.spread > 100 * self.noise)


def _two_valued_direction(n_high, seq_len):
    """Unit centred direction with ``n_high`` equal high entries: the critical points of eq. (6)."""
    d = np.full(seq_len, -n_high / seq_len)
    d[:n_high] += 1.0
    return d / np.linalg.norm(d)


def minimize_entropy(logit_norm, seq_len, *, restarts=16, seed=0, gtol=1e-10):
    r"""Numerically minimise the softmax entropy over the sphere ``||z - mean(z)|| = s``.

    Step 2 of the proof of Theorem 3.1 claims

    .. math:: \min_{z \in \mathbb R^T,\ \|z - \bar z\mathbf 1\| = s} H(\mathrm{softmax}(z)) = h_T(s),

    attained at z* of eq. (5). This function checks that claim without using it. It
    parametrises the sphere as :math:`z = s\,B u/\|u\|`, with B an orthonormal basis of the
    centred plane (eq. (4): softmax ignores shifts, so that plane is all there is), and runs
    BFGS (``scipy.optimize.minimize``) with the analytic gradient of eq. (6) chained
    through the normalisation. The objective is chosen for *relative* accuracy: where
    h_T(s) >= (log T)/2 the rescaled :math:`(H - \log T)\,T/s^2` (of order 1 even for tiny s,
    where H varies on the sphere only at order s³), elsewhere :math:`\log H` (H and its
    gradient are evaluated without cancellation, so a nearly one-hot row with H ~ 1e-13 is
    found to ~1e-12 relative instead of ~1e-9 absolute).
    Starts: ``restarts`` uniform random points, plus up to ``restarts`` adversarial ones: small
    perturbations of the other critical points, the two-valued rows with k = 2, ..., T-1 high
    entries (the saddles and maximiser of eq. (6)); the one-high vertex itself is never a start.
    (Minimising on the sphere is minimising on the ball, since h_T decreases in s, eq. (2).)

    Parameters
    ----------
    logit_norm : float
        s >= 0, the norm of the centred logits.
    seq_len : int
        T >= 2.
    restarts : int, default 16
        Number of random starts (and the maximum number of adversarial starts), >= 1.
    seed : int, default 0
        Seed of ``numpy.random.default_rng`` for the starts and perturbations.
    gtol : float, default 1e-10
        BFGS gradient tolerance on the rescaled objective.

    Returns
    -------
    EntropyMinimum
        ``value``, ``logits``, ``gap = value - h_T(s)``, ``bound``, ``start_values``,
        ``spread``, ``noise`` (agreement proves something only where ``informative``).

    Raises
    ------
    TypeError
        ``logit_norm`` not a real number, ``seq_len``/``restarts``/``seed`` not ints.
    ValueError
        ``logit_norm`` negative or not finite, ``seq_len`` outside [2, 2048] (BFGS keeps a
        dense (T-1)x(T-1) matrix), ``restarts`` < 1, ``seed`` < 0, ``gtol`` not positive.

    Examples
    --------
    The search lands on the closed form of eq. (2), from above:

    >>> r = minimize_entropy(1.0, 5, restarts=4, seed=1)
    >>> bool(0 <= r.gap < 1e-9 or abs(r.gap) < 1e-12)
    True
    >>> bool(np.isclose(np.linalg.norm(r.logits), 1.0)) and bool(abs(r.logits.sum()) < 1e-12)
    True
    """
    s = _check_scalar_norm(logit_norm, "logit_norm")
    t = _check_int(seq_len, "seq_len", 2, maximum=2048)
    restarts = _check_int(restarts, "restarts", 1)
    seed = _check_int(seed, "seed", 0)
    if isinstance(gtol, bool) or not (isinstance(gtol, (int, float)) and gtol > 0):
        raise ValueError(f"gtol must be a positive number, got {gtol!r}")
    bound = float(entropy_lower_bound(s, t))
    balanced = float(softmax_entropy(s * _two_valued_direction(max(t // 2, min(2, t - 1)), t)))
    if s == 0.0:
        z = np.zeros(t)
        value = float(softmax_entropy(z))
        return EntropyMinimum(value, z, value - bound, bound, np.array([value]),
                              balanced - bound, 16 * EPS * max(value, bound))
    basis = null_space(np.ones((1, t)))               # (T, T-1), orthonormal, columns sum to 0
    log_t = np.log(t)
    # t / s / s: s**2 overflows beyond 1.3e154 and flushes to 0 below 1.5e-162; where even this
    # is inf (s < ~1e-154), H - log T is below rounding anyway and the plain difference is used
    # (the result then says so: ``informative`` is False)
    scale = t / s / s
    if not np.isfinite(scale):
        scale = 1.0
    relative = bound < 0.5 * log_t                    # minimise log H: relative accuracy

    def objective(u):
        norm_u = np.linalg.norm(u)
        u_hat = u / norm_u
        h, grad_z = _entropy_and_grad(s * (basis @ u_hat))
        grad_u = basis.T @ grad_z
        grad_u = (s / norm_u) * (grad_u - u_hat * np.dot(u_hat, grad_u))
        if relative:
            h = max(h, 1e-300)
            return np.log(h), grad_u / h
        return (h - log_t) * scale, grad_u * scale

    rng = np.random.default_rng(seed)
    starts = [rng.standard_normal(t - 1) for _ in range(restarts)]
    n_highs = np.unique(np.linspace(2, t - 1, num=min(restarts, t - 2)).round().astype(int)) \
        if t > 2 else np.array([], dtype=int)
    for k in n_highs:
        u0 = basis.T @ _two_valued_direction(int(k), t)
        starts.append(u0 + 1e-3 * rng.standard_normal(t - 1))
    values, minimisers = [], []
    for u0 in starts:
        res = minimize(objective, u0, jac=True, method="BFGS", options={"gtol": gtol})
        z = s * (basis @ (res.x / np.linalg.norm(res.x)))
        values.append(float(softmax_entropy(z)))
        minimisers.append(z)
    best = int(np.argmin(values))
    return EntropyMinimum(values[best], minimisers[best], values[best] - bound, bound,
                          np.array(values), balanced - bound,
                          16 * EPS * max(values[best], bound))


# ------------------------------------------------------------------- the box pitfall
@dataclass(frozen=True)
class BoxMinimum:
    """Result of :func:`box_min_entropy`.

    Attributes
    ----------
    value : float
        The least entropy over the box ``|z_j| <= bound`` (nats).
    n_high : int
        k, the number of logits at ``+bound`` in a minimiser (the others are at ``-bound``).
    logits : numpy.ndarray
        That minimiser, shape ``(seq_len,)``.
    vertex_values : numpy.ndarray
        ``vertex_values[k]``, k = 0..T: the entropy with k logits at ``+bound``, T-k at ``-bound``.
    """

    value: float
    n_high: int
    logits: np.ndarray
    vertex_values: np.ndarray


def box_min_entropy(bound, seq_len):
    r"""Exact minimum of the softmax entropy over the box ``|z_j| <= b``, eq. (11).

    This is the feasible set when each token has ``||x_t|| <= 1`` and ``||W||_2 <= b`` (per-token
    norms), not the ℓ2 ball of Theorem 3.1. The minimum is attained at a vertex: if a
    coordinate k were strictly inside, stationarity (eq. (6)) would force
    :math:`z_k = \sum_j p_j z_j`, where :math:`\partial^2 H/\partial z_k^2 = -p_k(1 - p_k) < 0`,
    a strict local maximum along that coordinate. At a vertex the entropy depends only on the
    number k of logits at +b; with gap G = 2b and :math:`Z_k = k + (T-k)e^{-G}`,

    .. math:: H_k = \log Z_k + \frac{(T-k)\,G\,e^{-G}}{Z_k}\quad(1 \le k \le T),\qquad H_0 = \log T,

    and the minimum is :math:`\min_k H_k`. For small b the minimiser has k near T/2, so the
    one-hot row (k = 1) is not extremal; see :func:`one_hot_counterexample`.

    Parameters
    ----------
    bound : float
        b >= 0, the bound on every logit.
    seq_len : int
        T >= 1.

    Returns
    -------
    BoxMinimum
        ``value``, ``n_high`` (the smallest minimising k), ``logits``, ``vertex_values``.

    Raises
    ------
    TypeError
        ``bound`` not a real number, ``seq_len`` not an int.
    ValueError
        ``bound`` negative or not finite, ``seq_len`` outside [1, 10^7] (memory is O(T)).

    Examples
    --------
    At T = 10, b = 1 two high logits beat one:

    >>> r = box_min_entropy(1.0, 10)
    >>> r.n_high, bool(r.value < r.vertex_values[1])
    (2, True)
    >>> bool(np.isclose(softmax_entropy(r.logits), r.value))
    True
    """
    b = _check_scalar_norm(bound, "bound")
    t = _check_int(seq_len, "seq_len", 1, maximum=10**7)
    k = np.arange(1, t + 1, dtype=np.float64)
    gap = 2.0 * b
    with np.errstate(under="ignore", over="ignore"):  # e^-G underflows to 0 for large b
        decay = np.exp(-gap)
        z_k = k + (t - k) * decay
        vertex = np.empty(t + 1)
        vertex[0] = np.log(t)
        # G e^-G as one scalar, 0 once e^-G underflows (G = 2b may overflow to inf: inf * 0)
        gap_decay = gap * decay if decay > 0 else 0.0
        vertex[1:] = np.log(z_k) + (t - k) * gap_decay / z_k
    n_high = int(np.argmin(vertex))
    logits = np.where(np.arange(t) < n_high, b, -b)
    return BoxMinimum(float(vertex[n_high]), n_high, logits, vertex)


def box_min_entropy_search(bound, seq_len, *, restarts=16, seed=0):
    """Brute-force twin of :func:`box_min_entropy`: L-BFGS-B over the box from random starts.

    Minimises the softmax entropy over ``[-b, b]^T`` with the analytic gradient of eq. (6)
    (``scipy.optimize.minimize``, ``method="L-BFGS-B"``) from ``restarts`` random starts:
    half uniform in the box, half random sign patterns of random density (each logit
    +b with a probability drawn uniformly per start) plus small noise, since each vertex is a
    local minimum and uniform starts mostly find the balanced ones. It does not use the
    closed form or the vertex argument.

    Parameters
    ----------
    bound : float
        b >= 0.
    seq_len : int
        T >= 1.
    restarts : int, default 16
        Number of random starts, >= 1.
    seed : int, default 0
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    tuple of (float, numpy.ndarray)
        The least entropy found and its logits.

    Raises
    ------
    TypeError
        ``bound`` not a real number, ``seq_len``/``restarts``/``seed`` not ints.
    ValueError
        ``bound`` negative or not finite, ``seq_len`` outside [1, 10^4], ``restarts`` < 1,
        ``seed`` < 0.

    Examples
    --------
    >>> value, z = box_min_entropy_search(1.0, 6, restarts=8)
    >>> bool(abs(value - box_min_entropy(1.0, 6).value) < 1e-8)
    True
    """
    b = _check_scalar_norm(bound, "bound")
    t = _check_int(seq_len, "seq_len", 1, maximum=10**4)
    restarts = _check_int(restarts, "restarts", 1)
    seed = _check_int(seed, "seed", 0)
    rng = np.random.default_rng(seed)
    best_value, best_z = np.inf, None
    for i in range(restarts):
        if i % 2 == 0:
            z0 = rng.uniform(-b, b, size=t)
        else:
            signs = np.where(rng.random(t) < rng.random(), 1.0, -1.0)
            z0 = np.clip(b * signs + rng.normal(0.0, 0.1 * b, size=t), -b, b)
        res = minimize(_entropy_and_grad, z0, jac=True, method="L-BFGS-B",
                       bounds=[(-b, b)] * t, options={"ftol": 1e-15, "gtol": 1e-12})
        value = float(softmax_entropy(res.x))
        if value < best_value:
            best_value, best_z = value, res.x
    return best_value, best_z


@dataclass(frozen=True)
class OneHotCounterexample:
    """Result of :func:`one_hot_counterexample`.

    Attributes
    ----------
    naive : float
        Entropy of the one-hot row (one logit at +b, T-1 at -b, gap 2b): the "naive bound".
    box : BoxMinimum
        The true minimum over the box.
    is_counterexample : bool
        ``box.value < naive``: some row in the box has less entropy than the naive bound.
    """

    naive: float
    box: BoxMinimum
    is_counterexample: bool


def one_hot_counterexample(seq_len=10, bound=1.0):
    """The one-hot formula with gap 2b is not a lower bound on the box ``|z_j| <= b``.

    Under per-token norms each logit lies in [-b, b]; the naive analogue of eq. (5) puts one
    logit at +b and the rest at -b. At T = 10, b = 1 that row has entropy 1.8949 nats, while
    the row with two logits at +b (eq. (11)) has 1.8282 nats. From b* = 1.31426 on (at
    T = 10, where H_1 = H_2; ``tests/test_certify.py`` finds b* with mpmath) k = 1 wins
    again.

    Parameters
    ----------
    seq_len : int, default 10
        T >= 2.
    bound : float, default 1.0
        b >= 0.

    Returns
    -------
    OneHotCounterexample

    Raises
    ------
    TypeError
        ``bound`` not a real number, ``seq_len`` not an int.
    ValueError
        ``bound`` negative or not finite, ``seq_len`` outside [2, 10^7].

    Examples
    --------
    >>> c = one_hot_counterexample(10, 1.0)
    >>> round(c.naive, 4), round(c.box.value, 4), c.box.n_high, c.is_counterexample
    (1.8949, 1.8282, 2, True)
    """
    b = _check_scalar_norm(bound, "bound")
    t = _check_int(seq_len, "seq_len", 2, maximum=10**7)
    box = box_min_entropy(b, t)
    naive = float(box.vertex_values[1])
    return OneHotCounterexample(naive, box, bool(box.value < naive))


# ------------------------------------------------------------- Prop. 3.2, numerically
@dataclass(frozen=True)
class AdamUpdateBound:
    """Result of :func:`adam_update_bound`.

    Attributes
    ----------
    update : numpy.ndarray
        Adam's idealised update Δ = μ / sqrt(μ² + n²), entrywise.
    spectral_norm : float
        σ(Δ) = ``||Δ||_2`` (LAPACK SVD).
    bound : float
        The right side of eq. (14), sqrt((r c - Σ n²/(μ² + n²)) / min(r, c)) for an r×c
        matrix: sqrt(w) sqrt(1 - Σ n²/(μ²+n²) / w²) when r = c = w.
    """

    update: np.ndarray
    spectral_norm: float
    bound: float


def adam_update_bound(mean, noise_std):
    r"""Prop. 3.2, eq. (14), for one matrix: σ(Δ) and its lower bound, evaluated separately.

    For a gradient g = μ + ε with 𝔼ε = 0, 𝔼ε² = n² entrywise, Adam's idealised update is
    :math:`Δ = 𝔼[g]/\sqrt{𝔼[g^2]} = μ/\sqrt{μ^2 + n^2}`. Since ``||Δ||_2² >= ||Δ||_F² / rank``
    and :math:`\|Δ\|_F^2 = \sum μ^2/(μ^2+n^2) = rc - \sum n^2/(μ^2+n^2)`,

    .. math:: σ(Δ) \ge \sqrt{(rc - \textstyle\sum n^2/(μ^2+n^2)) / \min(r, c)},

    which is eq. (14) for r = c = w: with little noise it is about sqrt(w), so the spectral
    norm of a matrix's update grows like the square root of its width, while a scalar's is at
    most 1. ``spectral_norm`` comes from an SVD of Δ; ``bound`` from the sum of the noise
    ratios, not from Δ's norm, so the two are independent computations.

    Parameters
    ----------
    mean : array_like, shape (r, c)
        μ, the mean gradient (finite reals).
    noise_std : float or array_like
        n >= 0, the gradient noise's standard deviation, broadcast to ``mean``'s shape; at
        no entry may μ and n both be 0.

    Returns
    -------
    AdamUpdateBound
        ``update``, ``spectral_norm``, ``bound``.

    Raises
    ------
    TypeError
        Non-real input (strings, bools, complex).
    ValueError
        ``mean`` not 2-d or empty, non-finite values, negative ``noise_std``, shapes that do
        not broadcast, or an entry with μ = n = 0 (its update is undefined).

    Examples
    --------
    A noiseless Hadamard sign pattern meets the bound with equality, σ(Δ) = sqrt(w):

    >>> from scipy.linalg import hadamard
    >>> r = adam_update_bound(hadamard(8), 0.0)
    >>> round(r.spectral_norm, 12), round(r.bound, 12)
    (2.828427124746, 2.828427124746)
    """
    from theory.bound import _as_real_array
    mu = _as_real_array(mean, "mean")
    if mu.ndim != 2 or mu.size == 0:
        raise ValueError(f"mean must be a non-empty 2-d array, got shape {mu.shape}")
    n = _as_real_array(noise_std, "noise_std")
    if n.size and n.min() < 0:
        raise ValueError("noise_std must be >= 0")
    try:
        n = np.broadcast_to(n, mu.shape)
    except ValueError:
        raise ValueError(f"noise_std of shape {n.shape} does not broadcast to mean's shape "
                         f"{mu.shape}") from None
    denom = np.hypot(mu, n)                           # no overflow of mu^2 + n^2
    if np.any(denom == 0):
        raise ValueError("mean and noise_std are both 0 at some entry: the update is undefined")
    with np.errstate(under="ignore"):                 # ratios of 1e-300 / 1e300 flush to 0
        update = mu / denom
        ratio_sum = float(np.sum((n / denom) ** 2))   # sum n^2 / (mu^2 + n^2)
    r, c = mu.shape
    bound = float(np.sqrt(max(r * c - ratio_sum, 0.0) / min(r, c)))
    return AdamUpdateBound(update, float(np.linalg.norm(update, 2)), bound)
