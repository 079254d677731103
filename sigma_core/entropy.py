"""Attention entropy per (batch, head, query) row, the centred logit norm, and the bound inputs.

Row ``i`` of an attention head has logits ``z_i = scale * q_i . k_j`` over its visible keys ``j``
(plus an additive mask, if one is given) and probabilities ``p_i = softmax(z_i)``.  This module
measures

- the row entropy ``Ent(p_i) = -sum_j p_ij log p_ij`` in nats (theory/README.md, Notation);
- the centred logit norm ``||z_i - mean(z_i)||_2`` over the visible keys, the argument of the
  exact-row bound ``Ent(p_i) >= h_{T_i}(.)`` (``h_T`` of eq. (2); centring is free by eq. (4));
- per-head weight and token statistics (``sigma_h``, ``||X||_2``, ``||x_i||``, the centred token
  norm) from which the bound variants of eq. (7) follow through the chain of eq. (3)
  (:func:`bound_variant_norms`).

Equation numbers refer to theory/README.md.

Both methods run the same blocked pass over the keys.  ``"dense"`` uses one block holding all
``(B, H, Tq, Tk)`` logits; ``"streaming"`` walks over key blocks like flash attention and never
holds more than ``(B, H, Tq, block)`` values (a few such buffers): with the running max ``m``,
``l = sum e^{s-m}`` and ``r' = sum e^{s-m} (s - m)``, a new block with max ``m'`` rescales
``l <- e^{m-m'} l`` and ``r' <- e^{m-m'} (r' + (m - m') l)``, and at the end
``H = log l - r'/l``.  This is ``H = m + log l - r/l`` with ``r = sum e^{s-m} s`` rewritten
around ``m`` (``r' = r - m l``), which avoids the cancellation of the large terms ``m`` and
``r/l`` when the logits are large.  The centred norm is merged over blocks with Chan's
parallel-variance update (count, mean, sum of squared deviations), which is stable where
``sum s^2 - (sum s)^2 / n`` is not.  With ``causal=True`` rows that see nothing of a key block
skip it and rows that see all of it are processed without any mask, so a causal pass costs
about half a full one.

``exp`` is evaluated at ``max(s - m, c)`` with ``c = -80`` (float32) or ``-700`` (float64),
above the underflow range where ``exp`` takes a slow path, and the same clamped value enters
``r'``.  A clamped key changes ``l`` by less than ``e^c`` and ``r'`` by less than
``2 |c| e^c`` (``x e^x`` is monotone below -1), while ``l >= 1``: over ``n`` keys at most
``n * 1.5e-33`` (float32) or ``n * 1e-301`` (float64) nats, far below rounding.  Hidden keys
contribute exactly 0.

Masks follow :func:`torch.nn.functional.scaled_dot_product_attention`: a bool ``attn_mask`` is
True where a query may attend; a float mask is added to the logits and its ``-inf`` entries hide
keys, as do entries at or below ``torch.finfo(dtype).min / 2`` (the ``finfo.min`` masks of Hugging
Face and x-transformers; they would otherwise enter the centred norm as huge finite logits).  A
float mask holding only 0 and 1 is ambiguous (keep-mask or bias?) and raises ``ValueError``: pass
it as bool.  ``causal=True`` lets query ``i`` see keys ``j <= i`` (top-left aligned, as in SDPA).
A row with no visible key has no entropy: it raises ``ValueError``.

:func:`logits_row_stats` computes the same statistics from logits a model has already formed
(eager attention: the input of its softmax), with no second ``q k^T`` product.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from sigma_core.native import prefer_kernel
from sigma_core.native import row_entropy as native_row_entropy

__all__ = [
    "RowStats",
    "attention_entropy",
    "attention_row_stats",
    "logits_row_stats",
    "fused_row_entropy",
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


def _check_finite(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first tensor with a NaN or infinite entry (one device sync)."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite: it holds NaN or infinite entries")


def _real_scale(scale) -> float:
    """``scale`` as a float: a real number or a one-element real tensor; TypeError naming it."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(f"scale must be a real number, got a tensor {tuple(scale.shape)} {scale.dtype}")
        return float(scale.item())
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    return float(scale)


def _check_inputs(q, k, scale, causal, attn_mask, method, block_size, float_mask_is_bias=False):
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
    if q.shape[-1] < 1:
        raise ValueError(f"q and k need d_head >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    _check_finite(q=q, k=k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else _real_scale(scale)
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
        if attn_mask.is_floating_point() and not float_mask_is_bias:
            compact = _compact(attn_mask)
            if bool(((compact == 0) | (compact == 1)).all()) and bool((compact == 1).any()):
                raise ValueError(
                    "attn_mask is a float tensor of only 0 and 1, which is ambiguous (a keep-mask or an "
                    "additive bias?): pass a bool mask (True = attend, e.g. attn_mask.bool()) or an "
                    "additive float mask (0 where attended, -inf or torch.finfo(dtype).min where hidden)")
    return scale, attn_mask


def _hidden_threshold(dtype: torch.dtype) -> float:
    """Additive mask values at or below this hide a key: half of ``torch.finfo(dtype).min``.

    Hugging Face and x-transformers mask with ``finfo(dtype).min`` (or ``-finfo.max``) instead of
    ``-inf``; logits plus such a value stay far below this line, while no real logit comes near it.
    """
    return torch.finfo(dtype).min / 2


def _hide_huge_negatives(mask: torch.Tensor) -> torch.Tensor:
    """A float mask with every ``finfo.min``-like entry (see :func:`_hidden_threshold`) set to ``-inf``."""
    huge = mask <= _hidden_threshold(mask.dtype)
    return mask.masked_fill(huge, -math.inf) if bool(huge.any()) else mask


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """Undo broadcasting: a size-1 view along every stride-0 dimension (same values, smaller)."""
    idx = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                for st, n in zip(mask.stride(), mask.shape))
    return mask[idx]


def _visibility(mask, causal, rows: slice, j0: int, j1: int, device):
    """Visible keys of rows ``rows`` in key block ``j0:j1``, as the smallest broadcastable tensors.

    Returns ``(visible, additive)``: ``visible`` bool (None when every key is visible) and the
    float bias to add to the logits (None when there is none; 0 at hidden keys, so that every
    logit stays finite).  Both have at most the mask's (compact) shape, never
    ``(B, H, Tq, b)`` unless the mask itself is that large.
    """
    visible = bias = None
    if mask is not None:
        block = mask[..., rows if mask.shape[-2] > 1 else slice(None),
                     slice(j0, j1) if mask.shape[-1] > 1 else slice(None)]
        if block.dtype == torch.bool:
            visible = block
        else:
            visible = torch.isfinite(block) | (block > 0)  # +inf is not a meaningful mask value
            if bool(torch.where(visible, block, 0).any()):
                bias = block
    if causal:
        r = torch.arange(rows.start, rows.stop, device=device).unsqueeze(-1)
        tri = torch.arange(j0, j1, device=device) <= r  # (rows, b)
        if not bool(tri.all()):
            visible = tri if visible is None else (visible & tri)
    if visible is None or bool(visible.all()):
        return None, bias
    # hidden keys get a finite bias (0): they are excluded by ``visible`` in _State.update
    return visible, None if bias is None else torch.where(visible, bias, 0)


#: exp() arguments are clamped from below here (see the module docstring): avoids the slow
#: underflow path of exp and keeps every product e * (s - m) finite
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


class _State:
    """Running per-row accumulators over key blocks (shape (B, H, Tq) each).

    ``m`` running max, ``l = sum e^{s-m}``, ``r = sum e^{s-m} (s-m)`` (flash-attention style),
    ``n`` visible count, ``mu`` mean and ``m2`` summed squared deviations (Chan et al.), and
    ``extent`` (one past the last visible key).
    """

    def __init__(self, shape, cdt, device):
        self.m = torch.full(shape, -math.inf, dtype=cdt, device=device)
        self.l = torch.zeros(shape, dtype=cdt, device=device)
        self.r = torch.zeros(shape, dtype=cdt, device=device)
        self.n = torch.zeros(shape, dtype=cdt, device=device)
        self.mu = torch.zeros(shape, dtype=cdt, device=device)
        self.m2 = torch.zeros(shape, dtype=cdt, device=device)
        self.extent = torch.zeros(shape, dtype=torch.int64, device=device)

    def update(self, rows: slice, s, visible, j0: int, j1: int) -> None:
        """Merge the finite logits ``s`` ``(B, H, R, b)`` of rows ``rows`` and keys ``j0:j1``.

        ``visible`` (bool, broadcastable to ``s``, or None: all visible) selects the keys; ``s``
        is consumed (overwritten).
        """
        m, l, r = self.m[..., rows], self.l[..., rows], self.r[..., rows]
        n, mu, m2 = self.n[..., rows], self.mu[..., rows], self.m2[..., rows]
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        vis_f = None if visible is None else visible.to(s.dtype)
        # entropy accumulators: shift by the new running max m'
        if vis_f is None:
            bm = s.amax(-1)
        else:  # a broadcast add of a small 0/-inf tensor is cheaper than a broadcast where
            bm = (s + torch.where(visible, 0.0, -math.inf).to(s.dtype)).amax(-1)
        m_new = torch.maximum(m, bm)
        m_safe = torch.where(torch.isfinite(m_new), m_new, zero)  # rows with nothing visible yet
        old = torch.isfinite(m)
        alpha = torch.where(old, torch.exp(m - m_safe), zero)  # e^{m - m'}
        delta = torch.where(old, m - m_safe, zero)  # m - m'
        sc = s.sub_(m_safe.unsqueeze(-1))  # s - m' (<= 0 at visible keys)
        c = torch.clamp(sc, min=_EXP_FLOOR[s.dtype], max=0.0)  # see the module docstring
        e = torch.exp(c)
        if vis_f is not None:
            e.mul_(vis_f)  # 0 at hidden keys
        l_b = e.sum(-1)
        r.mul_(alpha).add_(alpha * delta * l).add_(c.mul_(e).sum(-1))  # in place: no new buffer
        l.mul_(alpha).add_(l_b)
        m.copy_(m_new)
        del e, c
        # centred-norm accumulators (Chan et al.); sc is shifted by m_safe, which cancels
        if vis_f is None:
            nb = torch.full_like(n, float(j1 - j0))
            mub_c = sc.mean(-1)
            m2b = torch.linalg.vector_norm(sc.sub_(mub_c.unsqueeze(-1)), dim=-1).square()
            self.extent[..., rows] = j1
        else:
            nb = vis_f.sum(-1).expand_as(n)
            mub_c = sc.mul_(vis_f).sum(-1) / nb.clamp(min=1)
            m2b = torch.linalg.vector_norm(sc.sub_(mub_c.unsqueeze(-1)).mul_(vis_f), dim=-1).square()
            cols = torch.arange(j0 + 1, j1 + 1, device=s.device)
            ext = torch.where(visible, cols, 0).amax(-1)
            ext_rows = self.extent[..., rows]
            ext_rows.copy_(torch.maximum(ext_rows, ext))
        mub = mub_c + m_safe
        ntot = n + nb
        ntot_safe = ntot.clamp(min=1)
        d = mub - mu
        mu.add_(d * nb / ntot_safe)
        m2.add_(m2b + d.square() * n * nb / ntot_safe)
        n.copy_(ntot)

    def finish(self, allow_empty: bool = False) -> RowStats:
        """The statistics; a row with no visible key raises ValueError, or with ``allow_empty``
        gets ``n_keys = 0`` and NaN entropy and norm (the monitor skips and counts such rows)."""
        n_keys = self.n.round().to(torch.int64)
        empty = n_keys == 0
        if bool(empty.any()):
            if not allow_empty:
                raise ValueError("attn_mask/causal leave a query row with no visible key: its entropy is undefined")
            nan = torch.full((), math.nan, dtype=self.l.dtype, device=self.l.device)
            entropy = torch.where(empty, nan, torch.log(self.l) - self.r / self.l.clamp(min=1))
            return RowStats(entropy, torch.where(empty, nan, self.m2.clamp(min=0).sqrt()), n_keys, self.extent)
        entropy = torch.log(self.l) - self.r / self.l
        return RowStats(entropy, self.m2.clamp(min=0).sqrt(), n_keys, self.extent)


def _row_stats(q, k, scale, causal, attn_mask, block_size, allow_empty=False):
    """Blocked pass over the keys; ``block_size >= Tk`` is the dense method (one block).

    With ``causal`` the rows that see nothing of a block skip it, and the rows that see all of
    it (below the diagonal) are processed without any mask.
    """
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    dev = q.device
    qs = q.to(cdt) * scale  # fold the scale into q: Tq*d multiplies instead of Tq*Tk
    kt = k.to(cdt).transpose(-1, -2)
    mask = None if attn_mask is None else _compact(attn_mask)
    if mask is not None and mask.is_floating_point():
        mask = _hide_huge_negatives(mask).to(cdt)
    state = _State((B, H, Tq), cdt, dev)
    for j0 in range(0, Tk, block_size):
        j1 = min(j0 + block_size, Tk)
        if causal:
            if j0 >= Tq:
                break  # no later row sees these keys
            # rows j0..j1-2 see part of the block; rows >= j1-1 see all of it
            parts = [slice(j0, min(j1 - 1, Tq)), slice(min(j1 - 1, Tq), Tq)]
        else:
            parts = [slice(0, Tq)]
        for rows in parts:
            if rows.start >= rows.stop:
                continue
            visible, additive = _visibility(mask, causal, rows, j0, j1, dev)
            s = torch.matmul(qs[..., rows, :], kt[..., j0:j1])  # (B, H, R, b)
            if additive is not None:
                s.add_(additive)
            state.update(rows, s, visible, j0, j1)
    return state.finish(allow_empty)


def attention_row_stats(q, k, *, scale=None, causal=False, attn_mask=None, method="auto",
                        block_size=512, _float_mask_is_bias=False, _allow_empty=False) -> RowStats:
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
        Broadcastable to ``(B, H, Tq, Tk)``; bool (True = attend) or float (added to the logits;
        ``-inf`` and ``finfo.min``-like entries hide keys).  A float mask of only 0 and 1 raises
        ``ValueError`` (ambiguous: pass ``attn_mask.bool()`` for a keep-mask).
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
    scale, attn_mask = _check_inputs(q, k, scale, causal, attn_mask, method, block_size,
                                     float_mask_is_bias=_float_mask_is_bias)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if method == "auto":
        method = "dense" if B * H * Tq * Tk <= AUTO_DENSE_MAX_ELEMENTS else "streaming"
    with torch.no_grad():
        return _row_stats(q.detach(), k.detach(), scale, causal, attn_mask,
                          Tk if method == "dense" else block_size, _allow_empty)


def logits_row_stats(logits: torch.Tensor, *, block_rows: int = 256, _allow_empty: bool = False) -> RowStats:
    """:class:`RowStats` of attention logits that are already formed, ``(B, H, Tq, Tk)``.

    ``logits`` is what a softmax attention normalises (scale, mask and any bias included); keys
    at ``-inf`` or at most ``torch.finfo(dtype).min / 2`` are hidden (the additive masks of
    Hugging Face and x-transformers).  The result equals :func:`attention_row_stats` of the
    factors of these logits; query rows are processed ``block_rows`` at a time, so the extra
    memory is a few ``(B, H, block_rows, Tk)`` buffers.

    Examples
    --------
    >>> z = torch.tensor([[[[0.0, 1.0, torch.finfo(torch.float32).min], [2.0, 0.5, -1.0]]]])
    >>> st = logits_row_stats(z)
    >>> st.n_keys.tolist(), round(float(st.entropy[0, 0, 0]), 6)  # row 0: softmax of (0, 1)
    ([[[2, 3]]], 0.582203)
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4 or logits.shape[-1] < 1 or logits.shape[-2] < 1:
        raise ValueError(f"logits must have shape (B, H, Tq, Tk) with Tq, Tk >= 1, got {tuple(logits.shape)}")
    if not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    B, H, Tq, Tk = logits.shape
    cdt = _compute_dtype(logits.dtype)
    thr = _hidden_threshold(logits.dtype)
    with torch.no_grad():
        z = logits.detach()
        if bool(torch.isnan(z).any()) or bool((z == math.inf).any()):
            raise ValueError("logits must not hold NaN or +inf")
        state = _State((B, H, Tq), cdt, z.device)
        for i0 in range(0, Tq, block_rows):
            rows = slice(i0, min(i0 + block_rows, Tq))
            zb = z[..., rows, :]
            visible = zb > thr  # -inf and finfo.min-like entries are hidden
            s = zb.to(cdt).masked_fill(~visible, 0.0)  # a new buffer: update() consumes it
            state.update(rows, s, None if bool(visible.all()) else visible, 0, Tk)
        return state.finish(_allow_empty)


#: rows whose logit scale ``|scale| ||q_i|| max_j ||k_j||`` exceeds this are recomputed exactly by
#: :func:`fused_row_entropy` (its float32 error grows like eps times this scale)
FUSED_MAX_LOGIT_SCALE = 32.0

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

#: :func:`fused_row_entropy` works through the batch in chunks of about this many query entries
#: (a few hundred KiB of float32, so that its products find q, k and the pass's output in cache)
FUSED_CHUNK_ELEMENTS = 1 << 16

#: up to this many keys :func:`fused_row_entropy` forms the logits in cache-sized blocks instead of
#: calling the flash kernel (which, at such lengths, costs as much for a causal pass as for a full one)
FUSED_DENSE_MAX_KEYS = 256

#: logits per block of that dense pass (512 KiB of float32), and query rows per block when causal
_DENSE_BLOCK_ELEMENTS = 1 << 17
_DENSE_CAUSAL_ROWS = 32


def _dense_row_entropy(q, k, scale: float, causal: bool) -> torch.Tensor:
    """Row entropies of short sequences from their logits, in blocks that stay in cache.

    One head at a time (strided views of ``q``, ``k``: nothing is copied), a few batch elements
    and, when causal, ``_DENSE_CAUSAL_ROWS`` query rows at a time with only the keys they can see,
    so the hidden upper triangle is mostly skipped.  Per block: ``s = z - max_j z`` clamped below
    at the float32 floor of the module docstring, ``e = exp(s)``, and
    ``Ent = log sum e - sum e s / sum e`` (no cancellation: ``s <= 0``).  Hidden keys enter at the
    floor, ``e^{-80}``, far below float32 rounding of ``sum e >= 1``.
    """
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    floor = _EXP_FLOOR[torch.float32]
    if causal:
        rows = [(r0, min(r0 + _DENSE_CAUSAL_ROWS, Tq)) for r0 in range(0, Tq, _DENSE_CAUSAL_ROWS)]
        bias = torch.full((Tq, Tk), -math.inf, dtype=q.dtype, device=q.device).triu_(1)  # 0 / -inf
    else:
        rows = [(0, Tq)]
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
    out = torch.empty((B, H, Tq), dtype=q.dtype, device=q.device)
    for r0, r1 in rows:
        keys = r1 if causal else Tk  # a causal row r < r1 sees keys 0..r
        block_bias = bias[r0:r1, :keys] if causal else bias
        c = max(1, _DENSE_BLOCK_ELEMENTS // ((r1 - r0) * keys))
        for h in range(H):
            for b0 in range(0, B, c):
                b1 = min(b0 + c, B)
                z = torch.baddbmm(block_bias, q[b0:b1, h, r0:r1], k[b0:b1, h, :keys].transpose(1, 2),
                                  alpha=scale)  # (c, R, keys) = bias + scale q k^T
                z.sub_(z.amax(-1, keepdim=True)).clamp_(min=floor)
                e = torch.exp(z)
                l = e.sum(-1)
                torch.sub(torch.log(l), torch.linalg.vecdot(e, z).div_(l), out=out[b0:b1, h, r0:r1])
    return out


def _finite_or_none(ent: torch.Tensor):
    """``ent`` clamped at 0 (rounding can leave -1e-7), or None when any entry is NaN or inf (NaN or
    inf in q or k: left to the caller's checks).  Entropies are <= log Tk, so their sum is finite
    exactly when every one is: one reduction instead of an elementwise test."""
    return ent.clamp_(min=0.0) if math.isfinite(float(ent.sum())) else None


def _torch_fast_path(q, k, scale: float, causal: bool) -> torch.Tensor:
    """The PyTorch path of :func:`fused_row_entropy` for short sequences (what the kernel is timed
    against by :func:`sigma_core.native.prefer_kernel`)."""
    return _dense_row_entropy(q, k, scale, causal)


def fused_row_entropy(q, k, *, scale=None, causal=False, max_logit_scale=FUSED_MAX_LOGIT_SCALE,
                      native=None):
    """Row entropies of unmasked attention, fast, or None where this path is not available.

    With ``native=True`` and the compiled kernel available (:mod:`sigma_core.native`: built on
    first use, about 25 s once), that kernel computes them for any length, a few query rows at a
    time with their logits in registers and the stable reduction below.  ``native=False`` takes the
    PyTorch path, which follows (also without a compiler).  ``native=None`` (default) takes the
    path measured to be faster on this machine (:func:`sigma_core.native.prefer_kernel`: both
    timed once, a fraction of a second, the choice cached beside the build; ``SIGMA_CORE_NATIVE=0``
    or ``1`` in the environment decides instead).

    Up to :data:`FUSED_DENSE_MAX_KEYS` keys the logits are formed in blocks small enough to stay
    in the core's cache (a few heads and, when causal, 32 query rows with only the keys they see),
    each block reduced to its rows' entropies at once, in the stable form of the module docstring.
    Longer sequences take one fused attention pass: by ``Ent(p_i) = logsumexp(z_i) - sum_j p_ij
    z_ij`` and ``z_ij = scale q_i . k_j``, the entropy
    is ``lse_i - scale q_i . (P K)_i``: one flash-attention call with the keys as values returns
    both ``P K`` and ``lse`` (PyTorch's CPU flash kernel), never forming the ``T x T`` logits and
    skipping the hidden half of a causal pass.  The two terms cancel when the logits are large, so
    the float32 error grows like ``eps * |scale| ||q_i|| max_j ||k_j||``; every ``(batch, head)``
    with a row whose logit scale exceeds ``max_logit_scale`` (default
    :data:`FUSED_MAX_LOGIT_SCALE`, an error of a few 1e-6 nats) is recomputed exactly by
    :func:`attention_row_stats`.

    Returns None (use :func:`attention_row_stats`) unless ``q``, ``k`` are finite, non-empty float32 tensors
    on the CPU of shape ``(B, H, T, d)`` with the same ``T`` when ``causal``.  Shapes are not
    validated further: this is the monitor's fast path, for the inputs of a running model.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    >>> fast = fused_row_entropy(q, k, causal=True)
    >>> bool((fast - attention_entropy(q, k, causal=True)).abs().max() < 1e-5)
    True
    """
    if (_FLASH_CPU is None or q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32
            or q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]
            or (causal and q.shape[2] != k.shape[2])):
        return None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    B, H, Tq, d = q.shape
    if min(q.numel(), k.numel()) == 0:
        return None  # nothing to gain: the blocked pass handles empty shapes
    if native is None:
        native = prefer_kernel(_torch_fast_path)
    if native:
        with torch.no_grad():
            ent = native_row_entropy(q.detach(), k.detach(), scale, bool(causal))
        if ent is not None:
            return _finite_or_none(ent)
    if k.shape[2] <= FUSED_DENSE_MAX_KEYS:
        with torch.no_grad():
            return _finite_or_none(_dense_row_entropy(q.detach(), k.detach(), scale, bool(causal)))
    # batch chunks of about FUSED_CHUNK_ELEMENTS query entries: the products below then read q, k
    # and the pass's output while they are still in the core's cache
    rows = max(1, FUSED_CHUNK_ELEMENTS // (H * Tq * d))
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        ent = torch.empty((B, H, Tq), dtype=q.dtype)
        q_norm, k_norm = torch.empty((B, H, Tq), dtype=q.dtype), torch.empty((B, H, k.shape[2]), dtype=q.dtype)
        for b0 in range(0, B, rows):
            c = slice(b0, b0 + rows)
            qb, kb = q[c], k[c]
            o, lse = _FLASH_CPU(qb, kb, kb, 0.0, bool(causal), scale=scale)[:2]  # o: (b, H, Tq, d), lse: (b, H, Tq)
            torch.sub(lse, o.mul_(qb).sum(-1), alpha=scale, out=ent[c])  # lse - scale q.(P K)
            torch.linalg.vector_norm(qb, dim=-1, out=q_norm[c])
            torch.linalg.vector_norm(kb, dim=-1, out=k_norm[c])
        reach = q_norm.amax(-1).mul_(k_norm.amax(-1)).mul_(abs(scale))  # (B, H): the largest row's logit scale
        if not bool(torch.isfinite(reach).all()):
            return None  # NaN or inf in q or k: left to the caller's checks
        redo = reach > max_logit_scale  # (B, H)
        if bool(redo.any()):
            b, h = redo.nonzero(as_tuple=True)
            exact = _row_stats(q[b, h].unsqueeze(0), k[b, h].unsqueeze(0), scale, bool(causal), None,
                               block_size=128).entropy[0]  # (n, Tq)
            ent[b, h] = exact
        return ent.clamp_(min=0.0)  # an entropy is >= 0; rounding can leave -1e-7


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
    """Per-head ``sigma_h = ||W_Q^h W_K^h^T||_2 * scale`` (the sigma of eq. (3)), shape ``(H,)``.

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
    _check_finite(w_q=w_q.detach(), w_k=w_k.detach())
    with torch.no_grad():
        # reduced QR: W = Q R with orthonormal columns in Q, so ||W_Q W_K^T|| = ||R_Q R_K^T||
        a = torch.linalg.qr(w_q.detach().double(), mode="r")[1]
        b = torch.linalg.qr(w_k.detach().double(), mode="r")[1]
        return torch.linalg.matrix_norm(a @ b.transpose(-1, -2), ord=2) * abs(_real_scale(scale))


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
    mean, bounds both quantities from above (the step from eq. (3) to the ``per_query`` and
    ``centered`` variants, with eq. (4)): ``log4 T + 1`` symmetric eigenvalue problems instead of
    one per row, each of size ``min(p, d)`` (``Y Y^T`` or ``Y^T Y``, which share their nonzero
    eigenvalues), formed from the centred prefix itself (no ``G - p mu mu^T`` cancellation) and
    solved in float64, whose relative rounding (~1e-13) is far below any tolerance applied to
    the entropy.  Non-causal rows use ``p = T``, which is exact.  Without ``extents`` only
    ``p = T`` is computed.

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
        cps = _checkpoints(T) if extents is not None else [T]
        full_k, cent_k = [], []
        for p in cps:
            xp = xd[:, :p]
            xc = xp - xp.mean(1, keepdim=True)
            y = torch.stack([xp, xc], 1)  # (B, 2, p, d)
            # the nonzero eigenvalues of Y Y^T and Y^T Y agree: take the smaller Gram matrix
            gram = y @ y.transpose(-1, -2) if p < d else y.transpose(-1, -2) @ y
            top = torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0).sqrt()  # (B, 2)
            full_k.append(top[:, 0])
            cent_k.append(top[:, 1])
        full_k, cent_k = torch.stack(full_k, 1), torch.stack(cent_k, 1)  # (B, K)
        if extents is None:
            return full_k, cent_k, full_k[:, -1]
        idx = torch.searchsorted(torch.tensor(cps, device=x.device), extents.to(x.device).contiguous())
        idx = idx.clamp(max=len(cps) - 1)
        return full_k.gather(1, idx), cent_k.gather(1, idx), full_k[:, -1]


def bound_variant_norms(stats: RowStats, sigma: torch.Tensor, x_q: torch.Tensor,
                        x_k: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Upper bounds on every row's centred logit norm, per variant of eq. (7) (theory/README.md).

    With ``sigma`` ``(H,)`` (:func:`head_sigma`), query tokens ``x_q`` ``(B, Tq, d)`` and key
    tokens ``x_k`` ``(B, Tk, d)`` (default ``x_q``: self-attention), for row ``i`` of head ``h``:

    - ``theorem``:   ``sigma_h ||X_q||_2 ||X_k||_2``  (``= sigma_h ||X||_2^2``, the bold sigma of eqs. (1), (3));
    - ``per_query``: ``sigma_h ||x_i|| ||X_{k,S_i}||_2``;
    - ``centered``:  ``sigma_h ||x_i|| ||(I - 11^T/T_i) X_{k,S_i}||_2``;
    - ``exact``:     the measured ``||z_i - mean(z_i)||`` (``stats.logit_norm``);

    where the key-set norms come from :func:`prefix_token_norms` (valid upper bounds).  Each
    returned tensor is ``(B, H, Tq)`` float64; ``h_{T_i}`` (eq. (2)) of it lower-bounds the row
    entropy, and the variants are ordered as in eq. (7).

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
