"""Attention entropy per (batch, head, query) row, the centred logit norm, and the bound inputs.

Row ``i`` of an attention head has logits ``z_i = scale * q_i . k_j`` over its visible keys ``j``
(plus an additive mask, if one is given) and probabilities ``p_i = softmax(z_i)``.  This module
measures

- the row entropy ``Ent(p_i) = -sum_j p_ij log p_ij`` in nats (theory/README.md, Notation);
- the centred logit norm ``||z_i - mean(z_i)||_2`` over the visible keys, the argument of the
  exact-row bound ``h_{T_i}(.)`` of eq. (2);
- per-head weight and token statistics (``sigma_h``, ``||X||_2``, ``||x_i||``, the centred token
  norm) from which the bound variants of eq. (1) follow (:func:`bound_variant_norms`).

Two methods compute the row statistics.  ``"dense"`` materialises the ``(B, H, Tq, Tk)`` logits.
``"streaming"`` walks over key blocks like flash attention and never holds more than
``(B, H, Tq, block)`` values: with the running max ``m``, ``l = sum e^{s-m}`` and
``r' = sum e^{s-m} (s - m)``, a new block with max ``m'`` rescales ``l <- e^{m-m'} l`` and
``r' <- e^{m-m'} (r' + (m - m') l)``, and at the end ``H = log l - r'/l``.  This is the form
``H = m + log l - r/l`` with ``r = sum e^{s-m} s`` rewritten around ``m`` (``r' = r - m l``), which
avoids the cancellation of the large terms ``m`` and ``r/l`` when the logits are large.  The
centred norm is merged over blocks with Chan's parallel-variance update (count, mean, sum of
squared deviations), which is stable where ``sum s^2 - (sum s)^2 / n`` is not.

Masks follow :func:`torch.nn.functional.scaled_dot_product_attention`: a bool ``attn_mask`` is
True where a query may attend; a float mask is added to the logits and its ``-inf`` entries hide
keys.  ``causal=True`` lets query ``i`` see keys ``j <= i`` (top-left aligned, as in SDPA).  A
row with no visible key has no entropy: it raises ``ValueError``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "RowStats",
    "attention_entropy",
    "attention_row_stats",
    "logit_row_norms",
    "head_sigma",
    "prefix_token_norms",
    "bound_variant_norms",
    "VARIANTS",
]

#: bound variants, weakest first, with the keys of ``theory.row_entropy_bounds``
VARIANTS = ("theorem", "per_query", "centered", "exact")

#: "auto" streams when the dense logits would hold more than this many elements
AUTO_DENSE_MAX_ELEMENTS = 1 << 22


class RowStats(NamedTuple):
    """Per-row statistics, each of shape ``(B, H, Tq)``.

    ``entropy`` (nats), ``logit_norm`` (centred logit norm over the visible keys), ``n_keys``
    (number of visible keys ``T_i``, int64) and ``extent`` (one past the index of the last
    visible key, int64: the prefix ``0..extent-1`` of the keys contains every visible key).
    """

    entropy: torch.Tensor
    logit_norm: torch.Tensor
    n_keys: torch.Tensor
    extent: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, scale, causal, attn_mask, method, block_size):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, d_head), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and d_head")
    if k.shape[2] < 1 or q.shape[2] < 1:
        raise ValueError("q and k need at least one position each")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if method not in ("auto", "dense", "streaming"):
        raise ValueError(f"method must be 'auto', 'dense' or 'streaming', got {method!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        try:
            attn_mask = attn_mask.expand(B, H, Tq, Tk)
        except RuntimeError as err:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, Tq, Tk)}"
            ) from err
    return scale, attn_mask


def _block_visible_and_bias(attn_mask, causal, Tq, j0, j1, device):
    """Visibility (bool, broadcastable to (B,H,Tq,j1-j0)) and additive bias (or None) of a block."""
    visible = None
    bias = None
    if attn_mask is not None:
        block = attn_mask[..., j0:j1]
        if block.dtype == torch.bool:
            visible = block
        else:
            visible = torch.isfinite(block) | (block > 0)  # +inf is not a meaningful mask value
            bias = block
    if causal:
        rows = torch.arange(Tq, device=device).unsqueeze(-1)
        cols = torch.arange(j0, j1, device=device)
        tri = cols <= rows  # (Tq, j1-j0)
        visible = tri if visible is None else (visible & tri)
    return visible, bias


def _block_logits(q, k, scale, bias, cdt, j0, j1):
    s = torch.matmul(q.to(cdt), k[..., j0:j1, :].to(cdt).transpose(-1, -2)) * scale  # (B,H,Tq,b)
    if bias is not None:
        s = s + bias.to(cdt)
    return s


def _finish(entropy, logit_norm, n_keys, extent):
    if bool((n_keys == 0).any()):
        raise ValueError("attn_mask/causal leave a query row with no visible key: its entropy is undefined")
    return RowStats(entropy, logit_norm, n_keys, extent)


def _dense(q, k, scale, causal, attn_mask):
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    visible, bias = _block_visible_and_bias(attn_mask, causal, Tq, 0, Tk, q.device)
    s = _block_logits(q, k, scale, bias, cdt, 0, Tk)  # (B, H, Tq, Tk)
    if visible is None:
        visible = torch.ones((1, 1, 1, Tk), dtype=torch.bool, device=q.device)
    visible = visible.expand(B, H, Tq, Tk)
    n_keys = visible.sum(-1)
    cols = torch.arange(1, Tk + 1, device=q.device)
    extent = torch.where(visible, cols, 0).amax(-1)
    if bool((n_keys == 0).any()):
        return _finish(None, None, n_keys, extent)
    full = bool(visible.all())
    p = torch.softmax(s if full else s.masked_fill(~visible, -math.inf), dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0 at hidden keys
    del p
    if full:
        dev = s - s.mean(-1, keepdim=True)
    else:
        s0 = s.masked_fill_(~visible, 0)
        dev = (s0 - s0.sum(-1, keepdim=True) / n_keys.unsqueeze(-1)).masked_fill_(~visible, 0)
    logit_norm = torch.linalg.vector_norm(dev, dim=-1)
    return _finish(entropy, logit_norm, n_keys, extent)


def _streaming(q, k, scale, causal, attn_mask, block_size):
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    dev_ = q.device
    shape = (B, H, Tq)
    m = torch.full(shape, -math.inf, dtype=cdt, device=dev_)  # running max
    l = torch.zeros(shape, dtype=cdt, device=dev_)  # sum e^{s-m}
    r = torch.zeros(shape, dtype=cdt, device=dev_)  # sum e^{s-m} (s-m)
    n = torch.zeros(shape, dtype=cdt, device=dev_)  # visible count (Chan)
    mu = torch.zeros(shape, dtype=cdt, device=dev_)  # running mean of visible logits
    m2 = torch.zeros(shape, dtype=cdt, device=dev_)  # sum of squared deviations
    extent = torch.zeros(shape, dtype=torch.int64, device=dev_)
    zero = torch.zeros((), dtype=cdt, device=dev_)
    for j0 in range(0, Tk, block_size):
        j1 = min(j0 + block_size, Tk)
        visible, bias = _block_visible_and_bias(attn_mask, causal, Tq, j0, j1, dev_)
        s = _block_logits(q, k, scale, bias, cdt, j0, j1)  # (B, H, Tq, b)
        if visible is not None:
            visible = visible.expand_as(s)
            s_m = s.masked_fill(~visible, -math.inf)
            nb = visible.sum(-1).to(cdt)
            cols = torch.arange(j0 + 1, j1 + 1, device=dev_)
            extent = torch.maximum(extent, torch.where(visible, cols, 0).amax(-1))
        else:
            s_m = s
            nb = torch.full(shape, float(j1 - j0), dtype=cdt, device=dev_)
            extent.fill_(j1)
        # entropy accumulators, flash-attention style
        m_new = torch.maximum(m, s_m.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, zero)
        alpha = torch.where(torch.isfinite(m), torch.exp(m - m_safe), zero)  # e^{m - m'}
        delta = torch.where(torch.isfinite(m), m - m_safe, zero)  # m - m'
        e = torch.exp(s_m - m_safe.unsqueeze(-1))  # 0 at hidden keys
        sm = torch.where(e > 0, s_m - m_safe.unsqueeze(-1), zero)
        r = alpha * (r + delta * l) + (e * sm).sum(-1)
        l = alpha * l + e.sum(-1)
        m = m_new
        # centred norm accumulators (Chan et al. parallel variance)
        nb_safe = torch.clamp(nb, min=1)
        if visible is not None:
            s0 = torch.where(visible, s, zero)
            mub = s0.sum(-1) / nb_safe
            m2b = torch.where(visible, s - mub.unsqueeze(-1), zero).square().sum(-1)
        else:
            mub = s.mean(-1)
            m2b = (s - mub.unsqueeze(-1)).square().sum(-1)
        ntot = n + nb
        ntot_safe = torch.clamp(ntot, min=1)
        d = mub - mu
        mu = mu + d * nb / ntot_safe
        m2 = m2 + m2b + d.square() * n * nb / ntot_safe
        n = ntot
    n_keys = n.round().to(torch.int64)
    if bool((n_keys == 0).any()):
        return _finish(None, None, n_keys, extent)
    entropy = torch.log(l) - r / l
    return _finish(entropy, m2.clamp(min=0).sqrt(), n_keys, extent)


def attention_row_stats(q, k, *, scale=None, causal=False, attn_mask=None, method="auto",
                        block_size=512) -> RowStats:
    """Entropy, centred logit norm, visible-key count and extent of every attention row, in one pass.

    Parameters
    ----------
    q, k : Tensor, shape (B, H, Tq, d_head) and (B, H, Tk, d_head)
        Queries and keys before the logit scale.  Half precision is computed in float32,
        float64 stays float64.
    scale : float, optional
        Logit scale; ``1/sqrt(d_head)`` by default.
    causal : bool
        Query ``i`` sees keys ``j <= i``.
    attn_mask : Tensor, optional
        Broadcastable to ``(B, H, Tq, Tk)``; bool (True = attend) or float (added to the logits).
    method : {"auto", "dense", "streaming"}
        ``"auto"`` streams when the logits would exceed ``AUTO_DENSE_MAX_ELEMENTS`` elements.
    block_size : int
        Keys per block of the streaming method.

    Returns
    -------
    RowStats
        See :class:`RowStats`.

    Raises
    ------
    ValueError
        On bad shapes or options, and when a row has no visible key.

    Examples
    --------
    >>> q = torch.zeros(1, 1, 3, 4); k = torch.randn(1, 1, 3, 4)
    >>> st = attention_row_stats(q, k, causal=True)
    >>> st.n_keys.tolist(), bool(torch.allclose(st.entropy, torch.log(st.n_keys.double()).float()))
    ([[[1, 2, 3]]], True)
    """
    scale, attn_mask = _check_inputs(q, k, scale, causal, attn_mask, method, block_size)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if method == "auto":
        method = "dense" if B * H * Tq * Tk <= AUTO_DENSE_MAX_ELEMENTS else "streaming"
    with torch.no_grad():
        if method == "dense":
            return _dense(q.detach(), k.detach(), scale, causal, attn_mask)
        return _streaming(q.detach(), k.detach(), scale, causal, attn_mask, block_size)


def attention_entropy(q, k, *, scale=None, causal=False, attn_mask=None, method="auto",
                      block_size=512) -> torch.Tensor:
    """Entropy ``-sum_j p_ij log p_ij`` (nats) of every attention row, shape ``(B, H, Tq)``.

    ``p_i = softmax(scale * q_i K^T + mask)`` over the visible keys (theory/README.md, Notation).
    Arguments as in :func:`attention_row_stats`; ``"dense"`` and ``"streaming"`` agree with a
    float64 dense reference to about 1e-6 in float32 and 1e-12 in float64.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    >>> h = attention_entropy(q, k, causal=True, method="streaming", block_size=7)
    >>> bool(torch.allclose(h, attention_entropy(q, k, causal=True, method="dense"), atol=1e-6))
    True
    >>> bool((h <= torch.log(torch.arange(1, 51.0)) + 1e-6).all())  # at most log T_i
    True
    """
    return attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=attn_mask,
                               method=method, block_size=block_size).entropy


def logit_row_norms(q, k, *, scale=None, causal=False, attn_mask=None, method="auto",
                    block_size=512) -> torch.Tensor:
    """Centred logit norm ``||z_i - mean(z_i)||_2`` over the visible keys of every row, ``(B, H, Tq)``.

    The argument of the exact-row bound ``Ent(p_i) >= h_{T_i}(||z_i - mean(z_i)||)`` of eq. (2)
    (softmax ignores shifts, so only the centred row matters).  Arguments as in
    :func:`attention_row_stats`; the streaming method merges block means and squared deviations.

    Examples
    --------
    >>> q = torch.ones(1, 1, 1, 1); k = torch.tensor([0.0, 3.0, 4.0]).reshape(1, 1, 3, 1)
    >>> round(float(logit_row_norms(q, k, scale=1.0)), 6)  # centred (-7/3, 2/3, 5/3)
    2.943920
    """
    return attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=attn_mask,
                               method=method, block_size=block_size).logit_norm


def head_sigma(w_q: torch.Tensor, w_k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-head ``sigma_h = ||W_Q^h W_K^h^T||_2 * scale`` (the sigma of eq. (1)), shape ``(H,)``.

    ``w_q``, ``w_k``: ``(H, d_q, d_head)``, ``(H, d_k, d_head)`` in the convention ``q_h = x @ W_Q[h]``.  Computed in
    float64 under ``no_grad`` from reduced QR factors: with ``W_Q = Q_1 R_1`` and
    ``W_K = Q_2 R_2`` (orthonormal columns), ``||W_Q W_K^T||_2 = ||R_1 R_2^T||_2``, a
    ``d_head x d_head`` problem instead of ``d x d``.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> wq, wk = torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    >>> direct = torch.linalg.matrix_norm(wq @ wk.transpose(-1, -2), ord=2).double()
    >>> bool(torch.allclose(head_sigma(wq, wk), direct, rtol=1e-5))
    True
    """
    if (w_q.dim() != 3 or w_k.dim() != 3 or w_q.shape[0] != w_k.shape[0]
            or w_q.shape[-1] != w_k.shape[-1]):
        raise ValueError(f"w_q {tuple(w_q.shape)} and w_k {tuple(w_k.shape)} must be (H, d_q, d_head) "
                         "and (H, d_k, d_head)")
    with torch.no_grad():
        # reduced QR: W = Q R with orthonormal columns in Q, so ||W_Q W_K^T|| = ||R_Q R_K^T||
        a = torch.linalg.qr(w_q.detach().double(), mode="r")[1]
        b = torch.linalg.qr(w_k.detach().double(), mode="r")[1]
        return torch.linalg.matrix_norm(a @ b.transpose(-1, -2), ord=2) * abs(float(scale))


def _checkpoints(T: int) -> list[int]:
    cps, p = [], 1
    while p < T:
        cps.append(p)
        p *= 4
    cps.append(T)
    return cps


def prefix_token_norms(x: torch.Tensor, extents: torch.Tensor | None = None):
    """Upper bounds on ``||X_S||_2`` and ``||(I - 11^T/|S|) X_S||_2`` for the key set of each row.

    ``x``: tokens ``(B, T, d)``.  Row ``i`` sees keys ``S_i`` inside the prefix
    ``0..extent_i-1`` (``extents``: ``(B, R)`` ints, default all ``T``).  A row subset never has
    a larger spectral norm, and ``||(I - P) Y||_2 <= ||Y - 1 c^T||_2`` for every ``c`` because
    ``(I - P) 1 = 0`` and ``||I - P||_2 = 1``.  So the exact (centred) spectral norm of the
    smallest power-of-four prefix ``0..p-1`` with ``p >= extent_i``, centred at that prefix's
    mean, bounds both quantities from above: ``log4 T + 1`` eigenvalue problems of size
    ``d x d`` (Gram matrices in float64) instead of one per row.  Non-causal rows use ``p = T``,
    which is exact.

    Returns
    -------
    (full, centred) : Tensors ``(B, R)`` float64, and ``full_T`` ``(B,)``: ``||X||_2``.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(2, 6, 3)
    >>> full, cent, full_T = prefix_token_norms(x, torch.tensor([[2, 6], [6, 6]]))
    >>> bool(torch.allclose(full[:, 1], torch.linalg.matrix_norm(x.double(), ord=2)))
    True
    >>> exact = torch.linalg.matrix_norm(x[0, :2].double() - x[0, :2].double().mean(0), ord=2)
    >>> bool(cent[0, 0] >= exact - 1e-12)
    True
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, T, d), got {tuple(x.shape)}")
    B, T, d = x.shape
    with torch.no_grad():
        xd = x.detach().double()
        cps = _checkpoints(T)
        grams, means = [], []
        g = torch.zeros(B, d, d, dtype=torch.float64, device=x.device)
        ssum = torch.zeros(B, d, dtype=torch.float64, device=x.device)
        prev = 0
        for p in cps:
            blk = xd[:, prev:p]
            g = g + blk.transpose(-1, -2) @ blk
            ssum = ssum + blk.sum(1)
            grams.append(g)
            means.append(ssum / p)
            prev = p
        gram = torch.stack(grams, 1)  # (B, K, d, d)
        mean = torch.stack(means, 1)  # (B, K, d)
        sizes = torch.tensor(cps, dtype=torch.float64, device=x.device).view(1, -1, 1, 1)
        gram_c = gram - sizes * mean.unsqueeze(-1) * mean.unsqueeze(-2)
        full_k = torch.linalg.eigvalsh(gram).amax(-1).clamp(min=0).sqrt()  # (B, K)
        cent_k = torch.linalg.eigvalsh(gram_c).amax(-1).clamp(min=0).sqrt()
        if extents is None:
            return full_k[:, -1:], cent_k[:, -1:], full_k[:, -1]
        idx = torch.searchsorted(torch.tensor(cps, device=x.device), extents.to(x.device).contiguous())
        idx = idx.clamp(max=len(cps) - 1)
        return full_k.gather(1, idx), cent_k.gather(1, idx), full_k[:, -1]


def bound_variant_norms(stats: RowStats, sigma: torch.Tensor, x_q: torch.Tensor,
                        x_k: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Upper bounds on every row's centred logit norm, per variant of theory/README.md.

    With ``sigma`` ``(H,)`` (:func:`head_sigma`), query tokens ``x_q`` ``(B, Tq, d)`` and key
    tokens ``x_k`` ``(B, Tk, d)`` (default ``x_q``: self-attention), for row ``i`` of head ``h``:

    - ``theorem``:   ``sigma_h ||X_q||_2 ||X_k||_2``  (``= sigma_h ||X||_2^2``, eq. (1));
    - ``per_query``: ``sigma_h ||x_i|| ||X_{k,S_i}||_2``;
    - ``centered``:  ``sigma_h ||x_i|| ||(I - 11^T/T_i) X_{k,S_i}||_2``;
    - ``exact``:     the measured ``||z_i - mean(z_i)||`` (``stats.logit_norm``);

    where the key-set norms come from :func:`prefix_token_norms` (valid upper bounds).  Each
    returned tensor is ``(B, H, Tq)`` float64; ``h_{T_i}`` of it lower-bounds the row entropy.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(1, 5, 4); wq, wk = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    >>> q, k = torch.einsum("btd,hde->bhte", x, wq), torch.einsum("btd,hde->bhte", x, wk)
    >>> st = attention_row_stats(q, k, scale=1.0, causal=True)
    >>> nb = bound_variant_norms(st, head_sigma(wq, wk), x)
    >>> all(bool((nb[a] >= nb[b] * (1 - 1e-9)).all()) for a, b in
    ...     [("theorem", "per_query"), ("per_query", "centered"), ("centered", "exact")])
    True
    """
    x_k = x_q if x_k is None else x_k
    B, H, Tq = stats.entropy.shape
    if x_q.shape[:2] != (B, Tq) or x_k.shape[0] != B:
        raise ValueError(f"x_q {tuple(x_q.shape)} / x_k {tuple(x_k.shape)} do not match the stats {(B, H, Tq)}")
    if sigma.shape != (H,):
        raise ValueError(f"sigma must have shape ({H},), got {tuple(sigma.shape)}")
    with torch.no_grad():
        # the key set of a row is the same in every head unless the mask is per head: take the max
        extent = stats.extent.amax(1)  # (B, Tq)
        full, cent, full_k = prefix_token_norms(x_k, extent)
        full_q = full_k if x_k is x_q else prefix_token_norms(x_q)[2]  # (B,)
        xi = x_q.detach().double().norm(dim=-1)  # (B, Tq)
        sig = sigma.double().to(x_q.device).view(1, H, 1)
        return {
            "theorem": sig * (full_q * full_k).view(B, 1, 1).expand(B, H, Tq),
            "per_query": sig * (xi * full).unsqueeze(1),
            "centered": sig * (xi * cent).unsqueeze(1),
            "exact": stats.logit_norm.double(),
        }
