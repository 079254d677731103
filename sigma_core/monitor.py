"""Watch the entropy of every attention head while a model runs, and check the bound live.

:class:`EntropyMonitor` attaches forward hooks to a model and, on every ``every``-th forward
of the whole model, records per attention layer and head the row entropies (mean, min), the
head's ``sigma_h`` (eq. (3) of theory/README.md) and the lower bounds ``h_{T_i}(s_i)``
(``h_T`` of eq. (2)) for the four variants of :data:`sigma_core.entropy.VARIANTS` (eq. (7)),
with the number of rows whose measured entropy falls below each bound.  A violation contradicts a theorem, so it is a bug: it is
reported loudly (:class:`BoundViolationWarning` and a logged error).

Supported attention modules:

- any module with a ``probe`` attribute of type :class:`~sigma_core.probe.AttentionProbe`
  (the project's ``CausalSelfAttention``): a forward hook on the probe receives ``(x, q, k)``;
  ``n_head``, ``scale``, ``causal`` and ``head_weights()`` of the owner give the rest;
- :class:`torch.nn.MultiheadAttention`, alone or inside ``nn.TransformerEncoderLayer``: a
  forward pre-hook (with kwargs) recomputes ``q`` and ``k`` from the inputs and in-projection
  (``batch_first`` or not, unbatched inputs, ``attn_mask`` / ``key_padding_mask`` as bool or
  float, ``kdim``/``vdim`` with separate projection weights).  Projection biases enter the bound
  through augmented tokens ``[x, 1]`` and weights ``[W; b]`` (the logits are then exactly
  ``[x_i,1] W~_Q W~_K^T [x_j,1]^T``).  ``add_bias_kv`` / ``add_zero_attn`` are not supported
  (such modules are skipped with a warning).  As in PyTorch itself, any hook disables the fused
  inference fast path of ``nn.TransformerEncoderLayer`` (eval mode without grad), so there the
  output can differ from the unhooked one by rounding; everywhere else it is bit-identical.

Hooks only read; statistics are computed under ``torch.no_grad()`` (which never advances
sigmaReparam's power iteration) and consume no random numbers, so outputs, gradients and RNG
streams are unchanged.

Record fields (one plain dict per layer and head, JSON-serialisable; ``None`` = not available):

``step`` (index of the model forward, from 0), ``layer`` (index among attention modules),
``name`` (module path), ``head``, ``seq_len`` (keys ``Tk``), ``n_rows`` (``B*Tq``),
``entropy_mean`` (over all rows), ``entropy_mean_half`` (over rows with at least ``Tk/2``
visible keys: the convention of CALIBRATION.md; equals ``entropy_mean`` without masks),
``entropy_min``, ``entropy_max``, ``log_seq_len``, ``sigma`` (``sigma_h``, with the scale),
``logit_norm_max`` (largest centred logit norm), ``bound_<variant>`` (min over checked rows of
``h_{T_i}(s_i)``), ``violations_<variant>`` (rows with entropy < bound - tol), ``bound_rows``
(rows checked: the first ``bound_samples`` batch elements).  With an additive (float, non-0/-inf)
attention mask only the ``exact`` variant applies; the others are ``None``.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import warnings
from collections import deque
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.entropy import VARIANTS, attention_row_stats, bound_variant_norms, head_sigma
from sigma_core.probe import AttentionProbe

try:  # one source of truth for h_T (eq. (2))
    from theory import entropy_lower_bound
except ImportError:  # pragma: no cover - theory/__init__ may not re-export it
    from theory.bound import entropy_lower_bound

__all__ = ["EntropyMonitor", "CollapseDetector", "BoundViolationWarning"]

logger = logging.getLogger(__name__)

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class BoundViolationWarning(RuntimeWarning):
    """A measured row entropy fell below a proven lower bound: a bug somewhere."""


def _tolerance(entropy: torch.Tensor) -> float:
    # rounding of logits/entropy in the compute dtype; float64 -> ~1e-10, float32 -> ~1e-4
    return 1e-10 if entropy.dtype == torch.float64 else 1e-4


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention convention (bool True = do NOT attend) -> additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


class EntropyMonitor:
    """Record per-head attention entropy and the entropy bound on every ``every``-th forward.

    Parameters
    ----------
    model : nn.Module
        Contains at least one supported attention module (see the module docstring).
    every : int
        Record on forwards ``0, every, 2*every, ...`` of ``model`` (counted by a forward
        pre-hook on ``model`` itself).
    path : str or os.PathLike, optional
        Append each record as one JSON line (``pandas.read_json(path, lines=True)`` reads it).
    detector : CollapseDetector, optional
        Fed with each recorded step; its events of the last recorded step are in ``events``.
    bound_samples : int or None
        Bound variants and violations are evaluated on the first ``bound_samples`` batch
        elements (``None``: all); entropies use every row.
    method, block_size
        Passed to :func:`sigma_core.entropy.attention_row_stats`.

    Attributes
    ----------
    last : list of dict
        The records of the most recent recorded forward (nothing older is kept).
    events : list of dict
        Collapse events of the most recent recorded forward.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    >>> x = torch.randn(3, 5, 8)
    >>> with EntropyMonitor(layer, every=2) as mon:
    ...     _ = layer(x); _ = layer(x); n_after_two = len(mon.last)
    >>> n_after_two, mon.last[0]["step"], sorted(r["violations_exact"] for r in mon.last)
    (2, 0, [0, 0])
    >>> all(r["entropy_min"] <= r["entropy_mean"] <= math.log(5) + 1e-6 for r in mon.last)
    True
    """

    def __init__(self, model: nn.Module, *, every: int = 1, path=None, detector=None,
                 bound_samples: int | None = 2, method: str = "auto", block_size: int = 512):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if bound_samples is not None and (not isinstance(bound_samples, int) or bound_samples < 1):
            raise ValueError(f"bound_samples must be a positive int or None, got {bound_samples!r}")
        if detector is not None and not hasattr(detector, "update"):
            raise TypeError("detector must have an update(records) method")
        if method not in ("auto", "dense", "streaming"):
            raise ValueError(f"method must be 'auto', 'dense' or 'streaming', got {method!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if path is not None and not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.every = every
        self.detector = detector
        self.bound_samples = bound_samples
        self.method = method
        self.block_size = block_size
        self.last: list[dict] = []
        self.events: list[dict] = []
        self._current: list[dict] = []
        self._forwards = 0
        self._step = -1
        self._active = False
        self._handles = []
        self._file = None
        layer = 0
        handles = [model.register_forward_pre_hook(self._on_root_pre, prepend=True)]
        for name, mod in model.named_modules():
            if isinstance(getattr(mod, "probe", None), AttentionProbe):
                handles.append(mod.probe.register_forward_hook(partial(self._on_probe, layer, name, mod)))
                layer += 1
            elif isinstance(mod, nn.MultiheadAttention):
                if mod.bias_k is not None or mod.add_zero_attn:
                    warnings.warn(f"EntropyMonitor: {name or 'model'} uses add_bias_kv/add_zero_attn, "
                                  "not supported: skipped", stacklevel=2)
                    continue
                handles.append(mod.register_forward_pre_hook(
                    partial(self._on_mha, layer, name, mod), with_kwargs=True))
                layer += 1
        handles.append(model.register_forward_hook(self._on_root_post))
        self._handles = handles
        if layer == 0:
            self.close()
            raise ValueError("model has no supported attention module (probe protocol or nn.MultiheadAttention)")
        self.n_layers = layer
        if path is not None:
            self._file = open(path, "a", encoding="utf-8")

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and close the JSON-lines file (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- root hooks ----------------------------------------------------------------------------
    def _on_root_pre(self, module, args):
        self._step = self._forwards
        self._forwards += 1
        self._active = self._step % self.every == 0
        self._current = []

    def _on_root_post(self, module, args, output):
        if not self._active:
            return
        self._active = False
        self.last = self._current
        self._current = []
        if self._file is not None:
            for rec in self.last:
                self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if self.detector is not None:
            self.events = list(self.detector.update(self.last))
            for ev in self.events:
                logger.warning("attention entropy collapse: %s", ev)

    # -- attention hooks ---------------------------------------------------------------------
    def _on_probe(self, layer, name, owner, probe, args, output):
        if not self._active:
            return
        x, q, k = args[:3]
        with torch.no_grad():
            w_q, w_k = owner.head_weights()
        self._record(layer, name, x, x, q, k, float(owner.scale), bool(owner.causal), None, w_q, w_k,
                     weights_valid=getattr(owner, "weight_bounds_valid", True))  # False: QK-LayerNorm

    def _on_mha(self, layer, name, mod, module, args, kwargs):
        if not self._active:
            return
        with torch.no_grad():
            ba = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
            ba.apply_defaults()
            a = ba.arguments
            query, key = a["query"], a["key"]
            unbatched = query.dim() == 2
            if unbatched:
                query, key = query.unsqueeze(1), key.unsqueeze(1)  # (L, 1, E)
            if mod.batch_first and not unbatched:
                xq, xk = query, key  # (N, L, E)
            else:
                xq, xk = query.transpose(0, 1), key.transpose(0, 1)
            E, H = mod.embed_dim, mod.num_heads
            dh = E // H
            N, L, S = xq.shape[0], xq.shape[1], xk.shape[1]
            if mod._qkv_same_embed_dim:
                wq, wk = mod.in_proj_weight[:E], mod.in_proj_weight[E:2 * E]
            else:
                wq, wk = mod.q_proj_weight, mod.k_proj_weight
            bq = bk = None
            if mod.in_proj_bias is not None:
                bq, bk = mod.in_proj_bias[:E], mod.in_proj_bias[E:2 * E]
            q = F.linear(xq, wq, bq).view(N, L, H, dh).transpose(1, 2)  # (N, H, L, dh)
            k = F.linear(xk, wk, bk).view(N, S, H, dh).transpose(1, 2)  # (N, H, S, dh)
            # theory convention q_h = x @ W_Q[h]: (H, d, dh); biases as an extra input row
            w_q = wq.detach().view(H, dh, -1).transpose(1, 2)
            w_k = wk.detach().view(H, dh, -1).transpose(1, 2)
            if bq is not None:
                w_q = torch.cat([w_q, bq.detach().view(H, 1, dh)], 1)
                w_k = torch.cat([w_k, bk.detach().view(H, 1, dh)], 1)
                xq = torch.cat([xq, xq.new_ones(N, L, 1)], -1)
                xk = torch.cat([xk, xk.new_ones(N, S, 1)], -1)
            cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
            mask = None
            attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
            if attn_mask is not None:
                am = _to_additive(attn_mask, cdt)
                mask = am.view(1, 1, L, S) if am.dim() == 2 else am.view(N, H, L, S)
            if kpm is not None:
                kp = _to_additive(kpm, cdt).view(N, 1, 1, S)
                mask = kp if mask is None else mask + kp
            causal = bool(a["is_causal"]) and attn_mask is None
            if mask is not None:
                finite = torch.isfinite(mask)
                if not bool(torch.where(finite, mask, 0).any()):
                    mask = finite  # pure masking: bool, True = attend
        if a["query"] is a["key"]:
            xk = xq  # self-attention: one set of token norms
        self._record(layer, name, xq, xk, q, k, 1.0 / math.sqrt(dh), causal, mask, w_q, w_k)

    # -- the record ----------------------------------------------------------------------------
    def _record(self, layer, name, xq, xk, q, k, scale, causal, mask, w_q, w_k, weights_valid=True):
        with torch.no_grad():
            if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
                # a diverging model: no entropy to measure; the training loop reports the divergence
                warnings.warn(f"EntropyMonitor: layer {layer} ({name}) has non-finite queries or keys "
                              f"at step {self._step}; not recorded", RuntimeWarning, stacklevel=2)
                return
            st = attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=mask,
                                     method=self.method, block_size=self.block_size)
            B, H, Tq = st.entropy.shape
            Tk = k.shape[2]
            ent = st.entropy
            half = st.n_keys >= Tk / 2  # (B, H, Tq)
            n_half = half.sum((0, 2))
            mean_half = torch.where(half, ent, 0).sum((0, 2)) / n_half.clamp(min=1)
            sigma = head_sigma(w_q, w_k, scale)  # (H,)
            nb = B if self.bound_samples is None else min(B, self.bound_samples)
            sub = type(st)(*(t[:nb] for t in st))
            additive = mask is not None and mask.dtype != torch.bool
            if additive or not weights_valid:  # logits not x W_Q W_K^T x^T: only the exact variant
                norms = {"exact": sub.logit_norm.double()}
            else:
                norms = bound_variant_norms(sub, sigma, xq[:nb], xk[:nb] if xk is not xq else None)
            n_keys = sub.n_keys.cpu().numpy()
            sub_ent = sub.entropy.double().cpu().numpy()
            tol = _tolerance(sub.entropy)
            per_head = {
                "entropy_mean": ent.mean((0, 2)).tolist(),
                "entropy_mean_half": mean_half.tolist(),
                "entropy_min": ent.amin((0, 2)).tolist(),
                "entropy_max": ent.amax((0, 2)).tolist(),
                "sigma": sigma.tolist(),
                "logit_norm_max": st.logit_norm.amax((0, 2)).tolist(),
            }
            for v in VARIANTS:
                if v not in norms:
                    per_head[f"bound_{v}"] = [None] * H
                    per_head[f"violations_{v}"] = [None] * H
                    continue
                h = entropy_lower_bound(norms[v].cpu().numpy(), n_keys)  # (nb, H, Tq)
                bad = sub_ent < h - tol * (1.0 + h)
                per_head[f"bound_{v}"] = h.min(axis=(0, 2)).tolist()
                per_head[f"violations_{v}"] = bad.sum(axis=(0, 2)).astype(int).tolist()
                if bad.any():
                    b, hh, i = (int(c[0]) for c in np.nonzero(bad))
                    msg = (f"entropy bound '{v}' violated (a bug) at step {self._step}, layer {layer} "
                           f"({name}), head {hh}: {int(bad.sum())} rows, e.g. row {i} of sample {b}: "
                           f"entropy {sub_ent[b, hh, i]:.9g} < bound {h[b, hh, i]:.9g}")
                    logger.error(msg)
                    warnings.warn(msg, BoundViolationWarning, stacklevel=2)
        half_counts = n_half.tolist()
        for hd in range(H):
            rec = {"step": self._step, "layer": layer, "name": name, "head": hd, "seq_len": Tk,
                   "n_rows": B * Tq, "log_seq_len": math.log(Tk), "bound_rows": nb * Tq}
            for key, vals in per_head.items():
                rec[key] = vals[hd]
            if half_counts[hd] == 0:
                rec["entropy_mean_half"] = None
            self._current.append(rec)


class CollapseDetector:
    """Flag attention heads whose entropy collapses.

    Rule (per ``(layer, head)``, on the value ``v`` = ``entropy_mean_half`` of each record, or
    ``entropy_mean`` when that is ``None``):

    - ``"low_entropy"``: ``v < fraction * log(seq_len)``.  The default ``fraction = 0.05`` puts
      the line at 0.24 nats for T = 128 and 0.28 for T = 256: CALIBRATION.md's healthy runs keep
      every head above 0.7 nats, collapsed ones fall to 0.003-0.1.
    - ``"drop"`` (only when ``drop_nats`` is given): ``v`` is more than ``drop_nats`` below the
      largest value of the same head over the previous ``window`` recorded steps.

    An event fires when a head *enters* a state (it does not repeat while the head stays
    there; it fires again after a recovery).  ``update`` returns the new events, each a dict
    with ``layer``, ``head``, ``step``, ``reason``, ``entropy`` and ``threshold``.

    Examples
    --------
    >>> det = CollapseDetector(fraction=0.1)
    >>> rec = lambda step, e: [{"layer": 0, "head": 0, "step": step, "seq_len": 100,
    ...                         "entropy_mean_half": e, "entropy_mean": e}]
    >>> det.update(rec(0, 4.0)), [ev["reason"] for ev in det.update(rec(1, 0.2))]
    ([], ['low_entropy'])
    >>> det.update(rec(2, 0.1))  # still collapsed: no new event
    []
    """

    def __init__(self, *, fraction: float = 0.05, drop_nats: float | None = None, window: int = 10):
        if not (0.0 < float(fraction) < 1.0):
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        if drop_nats is not None and not float(drop_nats) > 0:
            raise ValueError(f"drop_nats must be positive or None, got {drop_nats!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.fraction = float(fraction)
        self.drop_nats = None if drop_nats is None else float(drop_nats)
        self.window = window
        self._history: dict[tuple[int, int], deque] = {}
        self._state: dict[tuple[int, int, str], bool] = {}

    def update(self, records) -> list[dict]:
        """Feed the records of one step (list of dicts as in :class:`EntropyMonitor`); return new events."""
        events = []
        for rec in records:
            v = rec.get("entropy_mean_half")
            if v is None:
                v = rec["entropy_mean"]
            key = (rec["layer"], rec["head"])
            hist = self._history.setdefault(key, deque(maxlen=self.window))
            checks = [("low_entropy", self.fraction * math.log(rec["seq_len"]))]
            if self.drop_nats is not None and hist:
                checks.append(("drop", max(hist) - self.drop_nats))
            if self.drop_nats is not None and not hist:
                self._state[key + ("drop",)] = False
            for reason, threshold in checks:
                now = v < threshold
                if now and not self._state.get(key + (reason,), False):
                    events.append({"layer": rec["layer"], "head": rec["head"], "step": rec["step"],
                                   "reason": reason, "entropy": v, "threshold": threshold})
                self._state[key + (reason,)] = now
            hist.append(v)
        return events
