"""What the monitor measures: row statistics, ``sigma_h`` and the entropy bound of one attention call.

:class:`Measurement` turns one :class:`sigma_core.capture.Call` into the per-head records of
:class:`sigma_core.monitor.EntropyMonitor` (plain dicts; the fields are listed in that module's
docstring).  It chooses the measurement path: the fast path
(:func:`sigma_core.entropy.fused_row_entropy`) for the entropies of unmasked attention, the
blocked pass (:func:`sigma_core.entropy.attention_row_stats`) otherwise, the logits themselves
for an eager softmax (:func:`sigma_core.entropy.logits_row_stats`).  On a forward that checks
the bound it computes ``sigma_h`` (eq. (3) of theory/README.md) from the call's weights (checking
an adapter's ``scale (x W_Q)(x W_K)^T`` against the logits actually used), the lower bounds
``h_{T_i}(s_i)`` of the four variants of :data:`sigma_core.entropy.VARIANTS` on the sampled rows
and the rows below them; a violation is logged and warned (:class:`BoundViolationWarning`).

Everything runs under ``torch.no_grad()`` and consumes no random numbers.
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

from sigma_core.adapters import Projections
from sigma_core.capture import SHARDED, Adapted, Call, Weights
from sigma_core.entropy import (
    VARIANTS, RowStats, _hidden_threshold, attention_row_stats, bound_variant_norms, fused_row_entropy,
    head_sigma, logits_row_stats,
)
from sigma_core.whole_weights import ShardRead, holds_shard, refusing_shards

try:  # one source of truth for h_T (eq. (2))
    from theory import entropy_lower_bound
except ImportError:  # pragma: no cover - theory/__init__ may not re-export it
    from theory.bound import entropy_lower_bound

__all__ = ["BoundViolationWarning", "Measurement"]

logger = logging.getLogger("sigma_core.monitor")  # the monitor's logger: where users look for violations

#: largest |difference| between an adapter's logits and the logits used, relative to 1 + max|logit|
_ADAPTER_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_ADAPTER_RTOL_HALF = 3e-2


class BoundViolationWarning(RuntimeWarning):
    """A measured row entropy fell below a proven lower bound: a bug somewhere."""


def _tolerance(entropy: torch.Tensor) -> float:
    # rounding of logits/entropy in the compute dtype; float64 -> ~1e-10, float32 -> ~1e-4
    return 1e-10 if entropy.dtype == torch.float64 else 1e-4


def _no_warn_once(key: str, msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class Measurement:
    """Per-head records of one attention call.

    Parameters
    ----------
    bound_samples : int or None
        The bound is checked on every row of the first ``bound_samples`` batch elements (None: all).
    method, block_size
        Passed to :func:`sigma_core.entropy.attention_row_stats`.
    fused, native
        Use the fast path for unmasked attention, and its compiled kernel.
    warn_once : callable, optional
        ``warn_once(key, message)`` for warnings that should be given once per key (the
        monitor's); default: warn every time.

    Examples
    --------
    >>> from sigma_core.capture import NO_ADAPTER, Call
    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    >>> call = Call("sdpa", q, k, None, 8 ** -0.5, True, None, lambda: NO_ADAPTER)
    >>> recs = Measurement(bound_samples=1)(call, step=0, layer=0, name="attn", check=True)
    >>> [(r["head"], r["seq_len"], r["violations_exact"], r["bound_theorem"]) for r in recs]
    [(0, 4, 0, None), (1, 4, 0, None)]
    >>> recs[0]["weight_bound_note"]
    'no adapter for this attention module (sigma_core.adapters)'
    """

    def __init__(self, *, bound_samples: int | None = 1, method: str = "auto", block_size: int = 512,
                 fused: bool = True, native: bool | None = None, warn_once=None):
        self.bound_samples = bound_samples
        self.method = method
        self.block_size = block_size
        self.fused = fused
        self.native = native
        self._warn_once = warn_once or _no_warn_once

    def __call__(self, call: Call, *, step: int, layer: int, name: str, check: bool) -> list[dict]:
        """The records of ``call`` (one per head; empty when it cannot be measured, with a warning).

        ``check``: also compute ``sigma_h`` and check the bound (on the sampled rows).
        """
        with torch.no_grad():
            if call.logits is not None:
                z = call.logits
                if bool(torch.isnan(z).any()) or bool((z == math.inf).any()):
                    self._warn_once(f"nonfinite:{name}", f"EntropyMonitor: layer {layer} ({name}) has non-finite "
                                    f"logits at step {step}; not recorded")
                    return []
                st, sub = logits_row_stats(z, _allow_empty=True), None
                bound = None  # no bound check in this forward: no adapter, no sigma_h
                if check:
                    nb = self._nb(z.shape[0])
                    zs = z[:nb].double() if z.dtype == torch.float64 else z[:nb].float()
                    visible = zs > _hidden_threshold(z.dtype)
                    bound = self._bound(call, lambda: zs, visible, z.dtype)
            else:
                q, k = call.q, call.k
                stats = self._stats(step, layer, name, q, k, call.scale, call.causal, call.mask, check,
                                    call.fused)
                if stats is None:
                    return []
                st, sub = stats
                bound = None  # no bound check in this forward: no weights, no sigma_h
                if check:
                    nb = self._nb(q.shape[0])

                    def logits():  # of the sampled rows, mask not included (an adapter is checked on them)
                        z = torch.matmul(q[:nb].float() if q.dtype != torch.float64 else q[:nb],
                                         (k[:nb].float() if k.dtype != torch.float64 else k[:nb]).transpose(-1, -2))
                        return z.mul_(call.scale)

                    bound = self._bound(call, logits, None, q.dtype)
            return self._records(step, layer, name, call.source, st, call.n_keys, bound, sub, check)

    def _nb(self, B: int) -> int:
        return B if self.bound_samples is None else min(B, self.bound_samples)

    # -- statistics ------------------------------------------------------------------------------
    def _finite(self, step, layer, name, q, k) -> bool:
        # one reduction first: a finite sum proves finite entries (the elementwise check only on doubt)
        if bool(torch.isfinite(q.sum())) and bool(torch.isfinite(k.sum())):
            return True
        if bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all()):
            return True
        # a diverging model: no entropy to measure; the training loop reports the divergence
        warnings.warn(f"EntropyMonitor: layer {layer} ({name}) has non-finite queries or keys "
                      f"at step {step}; not recorded", RuntimeWarning, stacklevel=4)
        return False

    def _stats(self, step, layer, name, q, k, scale, causal, mask, check, fused=True):
        """``(st, sub)`` (None, with a warning, for non-finite ``q``/``k``): row statistics of every
        row (``logit_norm`` may be NaN outside the sampled rows) and exact ones of the first
        ``bound_samples`` batch elements (the rows checked; None when ``check`` is False and the
        fast path ran).

        Without a mask the entropies of all rows come from the fast path
        (:func:`sigma_core.entropy.fused_row_entropy`, CPU float32, accurate to a few 1e-6 nats)
        and the sampled rows' centred logit norms from their logits (a small dense product);
        otherwise every row takes the blocked pass of :func:`~sigma_core.entropy.attention_row_stats`.
        """
        nb = self._nb(q.shape[0])
        ent = (fused_row_entropy(q, k, scale=scale, causal=causal, native=self.native)
               if mask is None and self.fused and fused else None)
        if ent is None:
            if not self._finite(step, layer, name, q, k):
                return None
            st = attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=mask, method=self.method,
                                     block_size=self.block_size, _float_mask_is_bias=True, _allow_empty=True)
            return st, RowStats(*(t[:nb] for t in st))
        B, H, Tq = ent.shape
        Tk = k.shape[2]
        n = (torch.arange(1, Tq + 1, device=q.device).clamp(max=Tk) if causal
             else torch.full((Tq,), Tk, device=q.device)).expand(B, H, Tq)
        st = RowStats(ent, torch.full_like(ent, math.nan), n, n)  # visible keys form a prefix: extent = n
        if not check:
            return st, None
        # the sampled rows' centred logit norms: their (small) logits once, centred over the visible keys
        z = torch.matmul(q[:nb] * scale, k[:nb].transpose(-1, -2))  # (nb, H, Tq, Tk)
        vis = None
        if causal:
            vis = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril().to(z.dtype)  # (Tq, Tk)
            z.mul_(vis)
        mean = z.sum(-1, keepdim=True) / n[:nb].unsqueeze(-1).to(z.dtype)
        dev = z.sub_(mean)
        if vis is not None:
            dev.mul_(vis)
        norm = torch.linalg.vector_norm(dev, dim=-1)  # (nb, H, Tq)
        return st, RowStats(ent[:nb], norm, n[:nb], n[:nb])

    # -- the weights of the bound ----------------------------------------------------------------
    def _bound(self, call: Call, logits, visible, dtype):
        """``(sigma, x_q, x_k or None)`` for the weight-based variants, or the reason why they do
        not apply.  ``logits()``: the logits used, ``(nb, H, Tq, Tk)`` for the sampled batch
        elements (computed only to check an adapter); ``visible`` marks the keys compared (None = all)."""
        try:  # reading the weights never computes on an FSDP2 shard (no collective; never a shard's sigma)
            with refusing_shards():
                src = call.bound()
                proj = src.adapter(src.module, src.args, src.kwargs) if isinstance(src, Adapted) else None
        except ShardRead:
            return SHARDED
        if isinstance(src, str):
            return src
        if isinstance(src, Adapted):
            if isinstance(proj, Projections) and holds_shard((proj.w_q, proj.w_k, proj.x_q, proj.x_k)):
                return SHARDED
            return self._adapted(src, proj, logits(), visible, dtype)
        if not isinstance(src, Weights):
            raise TypeError(f"the bound source of a {call.source} call is a {type(src).__name__}")
        if holds_shard((src.w_q, src.w_k, src.x_q, src.x_k)):
            return SHARDED
        return head_sigma(src.w_q, src.w_k, src.scale), src.x_q, src.x_k

    @staticmethod
    def _adapted(src: Adapted, proj, z, visible, dtype):
        module = src.module
        if isinstance(proj, str):
            return proj
        if not isinstance(proj, Projections):
            raise TypeError(f"adapter for {type(module).__name__} returned {type(proj).__name__}")
        nb, H, Tq, Tk = z.shape
        w_q, w_k, x_q, x_k = proj.w_q, proj.w_k, proj.x_q, proj.x_k
        if (x_q.dim() != 3 or x_k.dim() != 3 or x_q.shape[1] != Tq or x_k.shape[1] != Tk
                or x_q.shape[0] < nb or w_q.shape[0] != H or H % w_k.shape[0]
                or w_q.shape[1] != x_q.shape[-1] or w_k.shape[1] != x_k.shape[-1]):
            return (f"the adapter's tokens/weights ({tuple(x_q.shape)}, {tuple(w_q.shape)}) do not match the "
                    f"attention call ({H} heads, {Tq} x {Tk}): a KV cache or packed sequences?")
        if w_k.shape[0] != H:
            w_k = w_k.repeat_interleave(H // w_k.shape[0], dim=0)
        cdt = z.dtype
        qa = torch.einsum("btd,hde->bhte", x_q[:nb].to(cdt), w_q.to(cdt))
        ka = torch.einsum("btd,hde->bhte", x_k[:nb].to(cdt), w_k.to(cdt))
        za = torch.matmul(qa, ka.transpose(-1, -2)).mul_(proj.scale)
        diff = (za - z).abs()
        ref = z.abs()
        if visible is not None:
            diff, ref = diff.masked_fill(~visible, 0), ref.masked_fill(~visible, 0)
        rtol = _ADAPTER_RTOL.get(dtype, _ADAPTER_RTOL_HALF)
        err, big = float(diff.max()), float(ref.max())
        if not err <= rtol * (1.0 + big):
            return (f"the logits differ from scale (x W_Q)(x W_K)^T by up to {err:.3g} (max |logit| {big:.3g}): "
                    "a position bias, rotary embedding or other extra not covered by the adapter")
        return head_sigma(w_q, w_k, proj.scale), x_q, x_k if x_k is not x_q else None

    # -- the records -----------------------------------------------------------------------------
    def _check_bound(self, step, layer, name, per_head, sub: RowStats, bound, note, nb):
        """Fill ``per_head`` with ``logit_norm_max`` and each variant's bound and violations on the
        checked rows ``sub`` that see a key (rows with none are skipped: they have no entropy); a
        violation is logged and warned (:class:`BoundViolationWarning`).

        A diverging model can overflow its logit norms (in the compute dtype) while its queries
        and keys are still finite: a row whose centred logit norm, measured or any variant's, is
        not finite has no bound to check.  Such rows are left out of the check and counted per head
        in ``rows_nonfinite`` (``bound_rows`` counts the rows checked); a head with no row left gets
        ``None`` for ``logit_norm_max`` and every ``bound_*`` (and 0 violations).  The record is
        kept and the forward never fails on them."""
        H = sub.entropy.shape[1]
        ok = sub.n_keys > 0  # (nb, H, Tq)
        if note is None:
            sigma, xq, xk = bound
            norms = bound_variant_norms(sub, sigma, xq[:nb], None if xk is None else xk[:nb])
        else:
            norms = {"exact": sub.logit_norm.double()}
        finite = torch.isfinite(sub.logit_norm)  # (nb, H, Tq)
        for t in norms.values():
            finite &= torch.isfinite(t)
        ok, dropped = ok & finite, ok & ~finite  # the rows checked; those left out (no finite norm)
        ok_np, dropped_np = torch.stack([ok, dropped]).cpu().numpy()  # one transfer for both masks
        n_keys = sub.n_keys.clamp(min=1).cpu().numpy()
        sub_ent = sub.entropy.double().cpu().numpy()
        tol = _tolerance(sub.entropy)
        per_head["bound_rows"] = ok_np.sum(axis=(0, 2)).astype(int).tolist()
        per_head["rows_nonfinite"] = dropped_np.sum(axis=(0, 2)).astype(int).tolist()
        lmax = torch.where(ok, sub.logit_norm, -math.inf).amax((0, 2)).tolist()
        per_head["logit_norm_max"] = [v if v > -math.inf else None for v in lmax]
        for v in VARIANTS:
            if v not in norms:
                per_head[f"bound_{v}"] = per_head[f"violations_{v}"] = [None] * H
                continue
            s = torch.where(ok, norms[v], 0.0).cpu().numpy()
            h = entropy_lower_bound(s, n_keys)  # (nb, H, Tq)
            bad = ok_np & (sub_ent < h - tol * (1.0 + h))
            hmin = np.where(ok_np, h, np.inf).min(axis=(0, 2))
            per_head[f"bound_{v}"] = [float(x) if np.isfinite(x) else None for x in hmin]
            per_head[f"violations_{v}"] = bad.sum(axis=(0, 2)).astype(int).tolist()
            if bad.any():
                b, hh, i = (int(c[0]) for c in np.nonzero(bad))
                msg = (f"entropy bound '{v}' violated (a bug) at step {step}, layer {layer} "
                       f"({name}), head {hh}: {int(bad.sum())} rows, e.g. row {i} of sample {b}: "
                       f"entropy {sub_ent[b, hh, i]:.9g} < bound {h[b, hh, i]:.9g}")
                logger.error(msg)
                warnings.warn(msg, BoundViolationWarning, stacklevel=4)

    def _records(self, step, layer, name, source, st: RowStats, Tk: int, bound, sub: RowStats | None,
                 check: bool) -> list[dict]:
        """One record per head.  ``bound``: ``(sigma, x_q, x_k or None)`` for the weight variants, a
        string saying why only the exact variant applies, or None in a forward that does not check
        the bound (then ``sigma`` is None too); ``sub``: the exact statistics of the checked rows
        (default: the first ``bound_samples`` batch elements of ``st``)."""
        B, H, Tq = st.entropy.shape
        ok = st.n_keys > 0  # rows that see a key (padding can leave none: no entropy, skipped and counted)
        n_ok = ok.sum((0, 2))
        ent = st.entropy
        half = st.n_keys >= Tk / 2  # (B, H, Tq)
        n_half = half.sum((0, 2))
        mean_half = torch.where(half, ent, 0).sum((0, 2)) / n_half.clamp(min=1)
        # one transfer for the per-head statistics: mean, mean_half, min, max, n_half, rows seeing a key
        summary = torch.stack([torch.where(ok, ent, 0).sum((0, 2)) / n_ok.clamp(min=1), mean_half,
                               torch.where(ok, ent, math.inf).amin((0, 2)),
                               torch.where(ok, ent, -math.inf).amax((0, 2)),
                               n_half.to(ent.dtype), n_ok.to(ent.dtype)]).tolist()
        per_head = dict(zip(("entropy_mean", "entropy_mean_half", "entropy_min", "entropy_max"), summary))
        half_counts, ok_counts = summary[4], [int(c) for c in summary[5]]
        nb = self._nb(B)
        note, sigma = (bound, None) if isinstance(bound, str) else (None, None if bound is None else bound[0])
        per_head["sigma"] = [None] * H if sigma is None else sigma.tolist()
        if not check:  # the entropy statistics only: the bound is checked every bound_every-th record
            per_head["logit_norm_max"] = [None] * H
            for v in VARIANTS:
                per_head[f"bound_{v}"] = per_head[f"violations_{v}"] = [None] * H
        else:
            self._check_bound(step, layer, name, per_head,
                              RowStats(*(t[:nb] for t in st)) if sub is None else sub, bound, note, nb)
        out = []
        for hd in range(H):
            rec = {"step": step, "layer": layer, "name": name, "source": source, "head": hd,
                   "seq_len": Tk, "n_rows": ok_counts[hd], "rows_no_key": B * Tq - ok_counts[hd],
                   "log_seq_len": math.log(Tk), "bound_rows": 0, "rows_nonfinite": 0}
            for key, vals in per_head.items():
                rec[key] = vals[hd]
            if half_counts[hd] == 0:
                rec["entropy_mean_half"] = None
            if ok_counts[hd] == 0:  # every row of this head is padding: nothing to measure
                rec["entropy_mean"] = rec["entropy_min"] = rec["entropy_max"] = None
            rec["weight_bound_note"] = note
            out.append(rec)
        return out
