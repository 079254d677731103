"""Watch the entropy of every attention head while a model runs, and check the bound live.

:class:`EntropyMonitor` attaches to a model and, on every ``every``-th forward of the whole
model, records per attention layer and head the row entropies (mean, min), the head's ``sigma_h``
(eq. (3) of theory/README.md) and the lower bounds ``h_{T_i}(s_i)`` (``h_T`` of eq. (2)) for the
four variants of :data:`sigma_core.entropy.VARIANTS` (eq. (7)), with the number of rows whose
measured entropy falls below each bound.  A violation contradicts a theorem, so it is a bug: it
is reported loudly (:class:`BoundViolationWarning` and a logged error).

Where the monitor sees attention (``source`` of a record):

- ``"sdpa"``: any call of :func:`torch.nn.functional.scaled_dot_product_attention` inside the
  model (Hugging Face ``attn_implementation="sdpa"``, x-transformers, most new code).  During a
  recorded forward only, a :class:`torch.overrides.TorchFunctionMode`
  (:class:`sigma_core.capture.AttentionInterceptor`) sees ``q``, ``k``, ``attn_mask``,
  ``is_causal``, ``scale`` and ``enable_gqa`` (or already repeated key heads) of each call; the
  statistics are computed by :func:`sigma_core.entropy.attention_row_stats` (streaming over key
  blocks when large), and the call itself runs unchanged.
- ``"softmax"``: a softmax over the last axis of a 4-D tensor inside the model, the
  ``(B, H, Tq, Tk)`` logits of an eager attention (Hugging Face ``attn_implementation="eager"``,
  x-transformers without flash): the statistics come from these logits
  (:func:`sigma_core.entropy.logits_row_stats`), with no second ``q k^T`` product.  Keys masked
  with ``-inf`` or ``finfo.min`` count as hidden.
- ``"probe"``: a module with an :class:`~sigma_core.probe.AttentionProbe` named ``probe`` (the
  project's attention): a forward hook on the probe receives ``(x, q, k)``; ``n_head``,
  ``scale``, ``causal`` and ``head_weights()`` of the owner give the rest.
- ``"mha"``: :class:`torch.nn.MultiheadAttention`, alone or inside
  ``nn.TransformerEncoderLayer``: a forward pre-hook recomputes ``q`` and ``k`` from the inputs
  and in-projection (``batch_first`` or not, unbatched inputs, ``attn_mask`` /
  ``key_padding_mask`` as bool or float, ``kdim``/``vdim``).  ``add_bias_kv`` /
  ``add_zero_attn`` are not supported (skipped with a warning).

Calls inside a ``probe`` or ``mha`` module are not recorded a second time.  A captured call is
named by the qualified name of the innermost module executing it (``transformer.h.0.attn``; read
from the Python call stack at the call, :class:`sigma_core.capture.ExecutingModules`), and
captured layers are numbered in call order (after the ``probe``/``mha`` layers, which are
numbered in module order).

The weight-based variants (theorem, per_query, centered) need the tokens and the per-head
``W_Q, W_K``: the probe protocol's ``head_weights()``, the in-projection of
``nn.MultiheadAttention``, or an adapter of :mod:`sigma_core.adapters` (Hugging Face GPT-2 and
BERT, x-transformers ``Attention``).  For a captured call the monitor checks, on the sampled rows,
that the adapter's ``scale (x W_Q)(x W_K)^T`` equals the logits actually used; where it cannot
apply (rotary embeddings, QK-normalisation, additive position biases, no adapter) those variants
are ``None`` and ``weight_bound_note`` says why; ``exact`` is always checked.

Hooks and the mode only read; statistics are computed under ``torch.no_grad()`` (which never
advances sigmaReparam's power iteration) and consume no random numbers, so outputs, gradients and
RNG streams are unchanged.  A recorded forward runs with a torch-function mode and forward hooks
active, which (as in PyTorch itself) turns off the fused inference fast path of
``nn.TransformerEncoder(Layer)`` (eval mode without grad, nested tensors for padding masks):
there, and only there, a recorded forward's output can differ from an unrecorded one by rounding.
A failure while recording is turned into a warning; the model's forward never fails because of
the monitor.

Record fields (one plain dict per layer and head, JSON-serialisable; ``None`` = not available):

Every recorded forward measures the entropies of every row; the bound (and ``sigma_h``) is
checked on the first recorded forward and every ``bound_every``-th after it (default 10), which
keeps recording every step cheap (measured by ``benchmarks/bench_entropy.py --part overhead``;
the figures are in docs/monitor.md).

``step`` (index of the model forward, from 0), ``layer`` (index among attention layers),
``name`` (module path), ``source`` (see above), ``head``, ``seq_len`` (keys ``Tk``), ``n_rows``
(``B*Tq``), ``entropy_mean`` (over all rows), ``entropy_mean_half`` (over rows with at least
``Tk/2`` visible keys; equals ``entropy_mean`` without masks), ``entropy_min``,
``entropy_max``, ``log_seq_len``, ``sigma`` (``sigma_h``, with the scale; ``None`` without
weights and on forwards that do not check the bound), ``logit_norm_max`` (largest centred logit norm of the checked rows), ``bound_<variant>`` (min over checked
rows of ``h_{T_i}(s_i)``), ``violations_<variant>`` (rows with entropy < bound - tol),
``bound_rows`` (rows checked: the first ``bound_samples`` batch elements; 0 on a forward that
does not check the bound, whose ``sigma``, ``logit_norm_max``, ``bound_*`` and ``violations_*``
are then ``None``) and ``weight_bound_note`` (why the weight-based variants are ``None`` on a
checked forward, else ``None``).  With an
additive (float, not only 0/-inf) attention mask only the ``exact`` variant applies.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import os
import warnings
from collections import deque
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.adapters import Projections, find_adapter
from sigma_core.capture import AttentionInterceptor, ExecutingModules, innermost, sdpa_arguments, suspended
from sigma_core.entropy import (
    VARIANTS, RowStats, _hidden_threshold, attention_row_stats, bound_variant_norms, fused_row_entropy,
    head_sigma, logits_row_stats,
)
from sigma_core.probe import AttentionProbe

try:  # one source of truth for h_T (eq. (2))
    from theory import entropy_lower_bound
except ImportError:  # pragma: no cover - theory/__init__ may not re-export it
    from theory.bound import entropy_lower_bound

__all__ = ["EntropyMonitor", "CollapseDetector", "BoundViolationWarning"]

logger = logging.getLogger(__name__)

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)

#: largest |difference| between an adapter's logits and the logits used, relative to 1 + max|logit|
_ADAPTER_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_ADAPTER_RTOL_HALF = 3e-2


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


def _pure_mask(mask: torch.Tensor | None) -> bool:
    """True when ``mask`` only hides keys (bool, or float of 0 and -inf/finfo.min-like values)."""
    if mask is None or mask.dtype == torch.bool:
        return True
    hidden = mask <= _hidden_threshold(mask.dtype)
    return not bool(torch.where(hidden, 0, mask).any())


def _is_int(x) -> bool:
    """An integer (Python or numpy, e.g. ``np.int64``), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


class EntropyMonitor:
    """Record per-head attention entropy and the entropy bound on every ``every``-th forward.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model with softmax attention (see the module docstring for what is seen).
    every : int
        Record on forwards ``0, every, 2*every, ...`` of ``model`` (counted by a forward
        pre-hook on ``model`` itself).
    path : str or os.PathLike, optional
        Append each record as one JSON line (``pandas.read_json(path, lines=True)`` reads it).
    detector : CollapseDetector, optional
        Fed with each recorded step; the events it returns are in ``events`` until the next forward.
    bound_samples : int or None
        Bound variants and violations are evaluated on every row of the first ``bound_samples``
        batch elements (default 1; ``None``: all); entropies use every row.
    method, block_size
        Passed to :func:`sigma_core.entropy.attention_row_stats`.
    capture : bool
        See calls of ``scaled_dot_product_attention`` and eager softmax attention (default True).
    fused : bool
        Take the entropies of unmasked attention from the fast path where available
        (:func:`sigma_core.entropy.fused_row_entropy`: CPU float32; default True); the bound is
        checked on the sampled rows' exact logits either way.
    native : bool or None
        Whether that fast path uses the compiled kernel (:mod:`sigma_core.native`, built on first
        use): True or False, or None (default) for the path measured to be faster on this machine
        (timed once, cached beside the build); ``SIGMA_CORE_NATIVE=0`` disables the kernel everywhere.
    bound_every : int
        Check the bound, and compute ``sigma_h``, on the first recorded forward and every
        ``bound_every``-th after it (default 10; 1: on every one); on the others ``sigma``,
        ``logit_norm_max`` and the ``bound_*``/``violations_*`` fields are ``None`` and
        ``bound_rows`` is 0, while the entropies of every row are recorded as usual.

    Attributes
    ----------
    last : list of dict
        The records of the most recent recorded forward (nothing older is kept).
    events : list of dict
        Collapse events of the most recent forward: the detector's new events after a recorded
        forward, empty after one that does not record (so a loop reading it after every step
        sees each event once).
    n_layers : int
        Attention layers seen so far.

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
                 bound_samples: int | None = 1, method: str = "auto", block_size: int = 512,
                 capture: bool = True, fused: bool = True, bound_every: int = 10, native: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not _is_int(every) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        every = int(every)
        if bound_samples is not None and (not _is_int(bound_samples) or bound_samples < 1):
            raise ValueError(f"bound_samples must be a positive int or None, got {bound_samples!r}")
        bound_samples = None if bound_samples is None else int(bound_samples)
        if detector is not None and not hasattr(detector, "update"):
            raise TypeError("detector must have an update(records) method")
        if method not in ("auto", "dense", "streaming"):
            raise ValueError(f"method must be 'auto', 'dense' or 'streaming', got {method!r}")
        if not _is_int(block_size) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        block_size = int(block_size)
        if path is not None and not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not isinstance(capture, bool):
            raise TypeError(f"capture must be a bool, got {type(capture).__name__}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        if native is not None and not isinstance(native, bool):
            raise TypeError(f"native must be a bool or None, got {type(native).__name__}")
        if not _is_int(bound_every) or bound_every < 1:
            raise ValueError(f"bound_every must be a positive int, got {bound_every!r}")
        bound_every = int(bound_every)
        # the file first: a path that cannot be opened raises before any hook is registered
        self._file = None if path is None else open(path, "a", encoding="utf-8")
        self.every = every
        self.detector = detector
        self.bound_samples = bound_samples
        self.method = method
        self.block_size = block_size
        self.capture = capture
        self.fused = fused
        self.native = native
        self.bound_every = bound_every
        self._recorded = 0  # recorded forwards so far
        self._check = False  # check the bound in this forward
        self.last: list[dict] = []
        self.events: list[dict] = []
        self._current: list[dict] = []
        self._forwards = 0
        self._step = -1
        self._active = False
        self._handles = []
        self._handled: dict[int, nn.Module] = {}  # probe/MHA modules by id (recorded by their own hooks)
        self._adapters: dict[int, object] = {}
        self._captured_layers: dict[tuple[str, int], int] = {}
        self._calls: dict[str, int] = {}
        self._warned: set[str] = set()
        self._mode = None
        self._mode_out = False  # the mode left for the forward of a probe/MHA module
        self._seen = False
        layer = 0
        adapted = []  # modules with an adapter: the capture keeps their forward arguments
        handles = [model.register_forward_pre_hook(self._on_root_pre, prepend=True, with_kwargs=True)]
        for name, mod in model.named_modules():
            ad = find_adapter(mod)
            if ad is not None:
                self._adapters[id(mod)] = ad
                adapted.append(mod)
            if isinstance(getattr(mod, "probe", None), AttentionProbe):
                handles.append(mod.probe.register_forward_hook(partial(self._on_probe, layer, name, mod)))
                self._handled[id(mod)] = mod
                layer += 1
            elif isinstance(mod, nn.MultiheadAttention):
                self._handled[id(mod)] = mod  # its internal SDPA call is not a second layer
                if mod.bias_k is not None or mod.add_zero_attn:
                    warnings.warn(f"EntropyMonitor: {name or 'model'} uses add_bias_kv/add_zero_attn, "
                                  "not supported: skipped", stacklevel=2)
                    continue
                handles.append(mod.register_forward_pre_hook(
                    partial(self._on_mha, layer, name, mod), with_kwargs=True))
                layer += 1
        handles.append(model.register_forward_hook(self._on_root_post, always_call=True))
        self._handles = handles
        self._n_static = layer
        self._stack = (ExecutingModules(model, watched=adapted, opaque=list(self._handled.values()),
                                        on_opaque=self._on_opaque) if capture else None)
        if layer == 0 and not capture:
            self.close()
            raise ValueError("model has no supported attention module (probe protocol or "
                             "nn.MultiheadAttention) and capture=False")

    @property
    def n_layers(self) -> int:
        """Attention layers known so far (probe/MHA modules, plus captured calls seen)."""
        return self._n_static + len(self._captured_layers)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and close the JSON-lines file (idempotent)."""
        self._stop_capture()
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

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _start_capture(self, args, kwargs) -> None:
        if self._stack is None:
            return
        self._stack.attach(args, kwargs)
        self._mode = AttentionInterceptor(self._on_sdpa, self._on_softmax)
        self._mode.__enter__()

    def _on_opaque(self, entering: bool) -> None:
        """Leave the torch-function mode while a probe/MHA module runs (it records its own
        attention; the calls inside would only pay for the mode's dispatch), enter it again after."""
        mode = self._mode
        if mode is None:
            return
        if entering:
            if innermost(mode):  # (a mode of the user's on top stays as it is)
                mode.__exit__(None, None, None)
                self._mode_out = True
        elif self._mode_out:
            self._mode_out = False
            mode.__enter__()

    def _stop_capture(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            out, self._mode_out = self._mode_out, False
            try:
                if not out:
                    mode.__exit__(None, None, None)
            except Exception as err:  # pragma: no cover - a mode entered inside the forward and left open
                self._warn_once("mode", f"EntropyMonitor: could not leave its torch-function mode: {err}")
        if self._stack is not None:
            self._stack.detach()

    # -- root hooks ----------------------------------------------------------------------------
    def _on_root_pre(self, module, args, kwargs):
        if self._mode is not None:  # a previous forward raised before the post hook could run
            self._stop_capture()
        self.events = []
        self._step = self._forwards
        self._forwards += 1
        self._active = self._step % self.every == 0
        self._check = self._active and self._recorded % self.bound_every == 0
        self._current = []
        self._calls = {}
        self._seen = False
        if self._active:
            self._start_capture(args, kwargs)

    def _on_root_post(self, module, args, output):
        self._stop_capture()
        if not self._active:
            return
        self._active = False
        self._recorded += 1
        self.last = self._current
        self._current = []
        if not self._seen and output is not None:  # None: the forward raised (or returns nothing)
            self._warn_once("nothing", "EntropyMonitor: the recorded forward made no attention call the monitor "
                            "can see (scaled_dot_product_attention, a softmax over (B, H, Tq, Tk) logits, the "
                            "probe protocol or nn.MultiheadAttention)")
        if self._file is not None:
            for rec in self.last:
                self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if self.detector is not None:
            self.events = list(self.detector.update(self.last))
            for ev in self.events:
                logger.warning("attention entropy collapse: %s", ev)

    # -- captured calls (SDPA, eager softmax) -------------------------------------------------------
    def _owner(self):
        """(name, adapter entry or None), or None when a probe/MHA module records this call."""
        if self._stack.in_opaque:  # inside a probe/MHA module's forward
            return None
        stack = self._stack.stack()
        name = stack[-1][0] if stack else ""
        entry = next(((m, a, kw) for _, m, a, kw in reversed(stack) if id(m) in self._adapters), None)
        return name, entry

    def _layer_for(self, name: str) -> int:
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        key = (name, k)
        if key not in self._captured_layers:
            self._captured_layers[key] = self._n_static + len(self._captured_layers)
        return self._captured_layers[key]

    def _guarded(self, name, fn, *args):
        try:
            fn(*args)
        except BoundViolationWarning:
            raise
        except Exception as err:  # never fail the user's forward
            self._warn_once(f"fail:{name}:{type(err).__name__}",
                            f"EntropyMonitor: could not record the attention call in {name or 'model'} "
                            f"at step {self._step}: {type(err).__name__}: {err}")

    def _on_sdpa(self, args, kwargs):
        if not self._active:
            return
        owner = self._owner()
        if owner is None:
            return
        self._seen = True
        self._guarded(owner[0], self._record_sdpa, owner, args, kwargs)

    def _on_softmax(self, logits, probs):
        if not self._active:
            return
        owner = self._owner()
        if owner is None:
            return
        self._seen = True
        self._guarded(owner[0], self._record_softmax, owner, logits)

    def _record_sdpa(self, owner, args, kwargs):
        name, entry = owner
        a = sdpa_arguments(args, kwargs)
        q, k, mask = a["query"], a["key"], a["attn_mask"]
        if q.is_nested or k.is_nested:
            self._warn_once(f"nested:{name}", f"EntropyMonitor: {name or 'model'} calls attention on nested "
                            "tensors, which the monitor cannot read: not recorded")
            return
        layer = self._layer_for(name)
        with torch.no_grad():
            q, k = q.detach(), k.detach()
            if q.dim() == 3:  # (B, T, E): one head
                q, k = q.unsqueeze(1), k.unsqueeze(1)
                mask = mask.unsqueeze(1) if mask is not None and mask.dim() == 3 else mask
            elif q.dim() > 4:  # extra batch dims folded into the heads
                q = q.reshape(q.shape[0], -1, *q.shape[-2:])
                k = k.reshape(k.shape[0], -1, *k.shape[-2:])
                if mask is not None and mask.dim() > 4:
                    mask = mask.reshape(mask.shape[0], -1, *mask.shape[-2:])
            H, Hk = q.shape[1], k.shape[1]
            if Hk != H:  # grouped-query attention (enable_gqa=True): key head h // (H / Hk)
                if H % Hk:
                    raise ValueError(f"{H} query heads are not a multiple of {Hk} key heads")
                k = k.repeat_interleave(H // Hk, dim=1)
            scale = a["scale"]
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            causal = bool(a["is_causal"])
            stats = self._stats(layer, name, q, k, scale, causal, mask)
            if stats is None:
                return
            st, sub = stats
            nb = self._nb(q.shape[0])
            if not self._check:
                bound = None  # no bound check in this forward: no adapter, no sigma_h
            elif not _pure_mask(mask):
                bound = "additive attention mask (a bias on the logits)"
            else:
                z = torch.matmul(q[:nb].float() if q.dtype != torch.float64 else q[:nb],
                                 (k[:nb].float() if k.dtype != torch.float64 else k[:nb]).transpose(-1, -2))
                bound = self._weights(entry, z.mul_(scale), None, q.dtype)
            self._record(layer, name, "sdpa", st, k.shape[2], bound, sub)

    def _record_softmax(self, owner, logits):
        name, entry = owner
        layer = self._layer_for(name)
        with torch.no_grad():
            z = logits.detach()
            if bool(torch.isnan(z).any()) or bool((z == math.inf).any()):
                self._warn_once(f"nonfinite:{name}", f"EntropyMonitor: layer {layer} ({name}) has non-finite "
                                f"logits at step {self._step}; not recorded")
                return
            st = logits_row_stats(z)
            bound = None  # no bound check in this forward: no adapter, no sigma_h
            if self._check:
                nb = self._nb(z.shape[0])
                zs = z[:nb].double() if z.dtype == torch.float64 else z[:nb].float()
                visible = zs > _hidden_threshold(z.dtype)
                bound = self._weights(entry, zs, visible, z.dtype)
            self._record(layer, name, "softmax", st, z.shape[3], bound)

    def _stats(self, layer, name, q, k, scale, causal, mask):
        """``(st, sub)`` (None, with a warning, for non-finite ``q``/``k``): row statistics of every row (``logit_norm`` may be NaN outside the sampled
        rows) and exact ones of the first ``bound_samples`` batch elements (the rows checked).

        Without a mask the entropies of all rows come from the fast path
        (:func:`sigma_core.entropy.fused_row_entropy`, CPU float32, accurate to a few 1e-6 nats)
        and the sampled rows' centred logit norms from their logits (a small dense product);
        otherwise every row takes the blocked pass of :func:`~sigma_core.entropy.attention_row_stats`.
        """
        nb = self._nb(q.shape[0])
        ent = (fused_row_entropy(q, k, scale=scale, causal=causal, native=self.native)
               if mask is None and self.fused else None)
        if ent is None:
            if not self._finite(layer, name, q, k):
                return None
            st = attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=mask, method=self.method,
                                     block_size=self.block_size, _float_mask_is_bias=True)
            return st, RowStats(*(t[:nb] for t in st))
        B, H, Tq = ent.shape
        Tk = k.shape[2]
        n = (torch.arange(1, Tq + 1, device=q.device).clamp(max=Tk) if causal
             else torch.full((Tq,), Tk, device=q.device)).expand(B, H, Tq)
        st = RowStats(ent, torch.full_like(ent, math.nan), n, n)  # visible keys form a prefix: extent = n
        if not self._check:
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

    def _nb(self, B: int) -> int:
        return B if self.bound_samples is None else min(B, self.bound_samples)

    def _weights(self, entry, z, visible, dtype):
        """(sigma, x_q, x_k) for the weight-based variants, or the reason why they do not apply.

        ``z``: the logits used, ``(nb, H, Tq, Tk)`` for the sampled batch elements (mask not
        included for SDPA; ``visible`` marks the keys compared, None = all).
        """
        if entry is None:
            return "no adapter for this attention module (sigma_core.adapters)"
        module, args, kwargs = entry
        proj = self._adapters[id(module)](module, args, kwargs)
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

    def _finite(self, layer, name, q, k) -> bool:
        # one reduction first: a finite sum proves finite entries (the elementwise check only on doubt)
        if bool(torch.isfinite(q.sum())) and bool(torch.isfinite(k.sum())):
            return True
        if bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all()):
            return True
        # a diverging model: no entropy to measure; the training loop reports the divergence
        warnings.warn(f"EntropyMonitor: layer {layer} ({name}) has non-finite queries or keys "
                      f"at step {self._step}; not recorded", RuntimeWarning, stacklevel=3)
        return False

    # -- probe and nn.MultiheadAttention hooks ---------------------------------------------------
    def _on_probe(self, layer, name, owner, probe, args, output):
        if not self._active:
            return
        self._seen = True
        with suspended(self._mode):  # the monitor's own arithmetic does not go through the mode
            self._probe(layer, name, owner, args)

    def _probe(self, layer, name, owner, args):
        x, q, k = args[:3]
        x_k = args[3] if len(args) > 3 else None  # cross-attention: the key-side tokens
        with torch.no_grad():
            stats = self._stats(layer, name, q, k, float(owner.scale), bool(owner.causal), None)
            if stats is None:
                return
            st, sub = stats
            if not self._check:
                bound = None  # no bound check in this forward: sigma_h is not needed
            elif getattr(owner, "weight_bounds_valid", True):
                w_q, w_k = owner.head_weights()
                bound = (head_sigma(w_q, w_k, float(owner.scale)), x, x_k)
            else:  # QK-LayerNorm: logits not x W_Q W_K^T x^T
                bound = "QK-normalisation: the logits are formed from normalised q, k, not from x W"
        self._record(layer, name, "probe", st, k.shape[2], bound, sub)

    def _on_mha(self, layer, name, mod, module, args, kwargs):
        if not self._active:
            return
        with suspended(self._mode):  # the monitor's own arithmetic does not go through the mode
            self._mha(layer, name, mod, args, kwargs)

    def _mha(self, layer, name, mod, args, kwargs):
        self._seen = True
        with torch.no_grad():
            ba = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
            ba.apply_defaults()
            a = ba.arguments
            query, key = a["query"], a["key"]
            if query.is_nested or key.is_nested:  # the fused inference path of nn.TransformerEncoder
                self._warn_once(f"nested:{name}", f"EntropyMonitor: {name or 'model'} receives nested tensors "
                                "(the fast path of nn.TransformerEncoder with a padding mask): not recorded")
                return
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
            if mask is not None and _pure_mask(mask):
                mask = mask > _hidden_threshold(mask.dtype)  # pure masking: bool, True = attend
            if not self._finite(layer, name, q, k):
                return
            scale = 1.0 / math.sqrt(dh)
            st = attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=mask, method=self.method,
                                     block_size=self.block_size, _float_mask_is_bias=True)
            if not self._check:
                bound = None  # no bound check in this forward: sigma_h is not needed
            elif mask is not None and mask.dtype != torch.bool:
                bound = "additive attention mask (a bias on the logits)"
            else:
                bound = (head_sigma(w_q, w_k, scale), xq, xk if a["query"] is not a["key"] else None)
        self._record(layer, name, "mha", st, S, bound)

    # -- the record ----------------------------------------------------------------------------
    def _check_bound(self, layer, name, per_head, sub: RowStats, bound, note, nb):
        """Fill ``per_head`` with ``logit_norm_max`` and each variant's bound and violations on the
        checked rows ``sub``; a violation is logged and warned (:class:`BoundViolationWarning`)."""
        H = sub.entropy.shape[1]
        if note is None:
            sigma, xq, xk = bound
            norms = bound_variant_norms(sub, sigma, xq[:nb], None if xk is None else xk[:nb])
        else:
            norms = {"exact": sub.logit_norm.double()}
        n_keys = sub.n_keys.cpu().numpy()
        sub_ent = sub.entropy.double().cpu().numpy()
        tol = _tolerance(sub.entropy)
        per_head["logit_norm_max"] = sub.logit_norm.amax((0, 2)).tolist()
        for v in VARIANTS:
            if v not in norms:
                per_head[f"bound_{v}"] = per_head[f"violations_{v}"] = [None] * H
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
                warnings.warn(msg, BoundViolationWarning, stacklevel=3)

    def _record(self, layer, name, source, st: RowStats, Tk: int, bound, sub: RowStats | None = None):
        """Append one record per head.  ``bound``: ``(sigma, x_q, x_k or None)`` for the weight
        variants, a string saying why only the exact variant applies, or None in a forward that
        does not check the bound (then ``sigma`` is None too); ``sub``: the exact
        statistics of the checked rows (default: the first ``bound_samples`` batch elements of
        ``st``)."""
        with torch.no_grad():
            B, H, Tq = st.entropy.shape
            ent = st.entropy
            half = st.n_keys >= Tk / 2  # (B, H, Tq)
            n_half = half.sum((0, 2))
            mean_half = torch.where(half, ent, 0).sum((0, 2)) / n_half.clamp(min=1)
            # one transfer for the per-head entropy statistics: rows mean, mean_half, min, max, n_half
            summary = torch.stack([ent.mean((0, 2)), mean_half, ent.amin((0, 2)), ent.amax((0, 2)),
                                   n_half.to(ent.dtype)]).tolist()
            per_head = dict(zip(("entropy_mean", "entropy_mean_half", "entropy_min", "entropy_max"), summary))
            half_counts = summary[4]
            nb = self._nb(B)
            note, sigma = (bound, None) if isinstance(bound, str) else (None, None if bound is None else bound[0])
            check = self._check
            per_head["sigma"] = [None] * H if sigma is None else sigma.tolist()
            if not check:  # the entropy statistics only: the bound is checked every bound_every-th record
                per_head["logit_norm_max"] = [None] * H
                for v in VARIANTS:
                    per_head[f"bound_{v}"] = per_head[f"violations_{v}"] = [None] * H
            else:
                self._check_bound(layer, name, per_head, RowStats(*(t[:nb] for t in st)) if sub is None else sub,
                                  bound, note, nb)
        for hd in range(H):
            rec = {"step": self._step, "layer": layer, "name": name, "source": source, "head": hd,
                   "seq_len": Tk, "n_rows": B * Tq, "log_seq_len": math.log(Tk),
                   "bound_rows": nb * Tq if check else 0}
            for key, vals in per_head.items():
                rec[key] = vals[hd]
            if half_counts[hd] == 0:
                rec["entropy_mean_half"] = None
            rec["weight_bound_note"] = note
            self._current.append(rec)


class CollapseDetector:
    """Flag attention heads whose entropy collapses.

    Rule (per ``(layer, head)``, on the value ``v`` = ``entropy_mean_half`` of each record, or
    ``entropy_mean`` when that is ``None``):

    - ``"low_entropy"``: ``v < fraction * log(seq_len)``.  The default ``fraction = 0.05`` puts
      the line at 0.24 nats for T = 128 and 0.28 for T = 256; in the committed CPU demo and sweep
      (``results/``) stable runs keep every head well above it and collapsed heads fall below 0.1.
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
