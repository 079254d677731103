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
the monitor.  Nothing is dropped silently: an attention call that is not recorded (an error, nested
tensors, non-finite values, ``flex_attention``, a forward inside compiled code) is listed in
:attr:`EntropyMonitor.skipped` on every recorded forward and counted in ``n_skipped``, and query
rows that see no key (left padding in a causal model) are skipped and counted per record
(``rows_no_key``) while the other rows are recorded.

Under ``torch.compile`` (the model compiled before or after the monitor is attached,
``torch.compile(model)`` passed as ``model``, or ``model.compile()``) the forwards that record run
eagerly (:class:`sigma_core.capture.CompiledForwards`: ``torch.compiler.set_stance("force_eager")``
for that forward only) and give an eager model's records; the others run the compiled graph.  A
recorded forward inside compiled code the monitor was not attached through (a compiled training
step) is skipped and counted, with a warning that says what to do.

Record fields (one plain dict per layer and head, JSON-serialisable; ``None`` = not available):

Every recorded forward measures the entropies of every row; the bound (and ``sigma_h``) is
checked on the first recorded forward and every ``bound_every``-th after it (default 10), which
keeps recording every step cheap (measured by ``benchmarks/bench_entropy.py --part overhead``;
the figures are in docs/monitor.md).

``step`` (index of the model forward, from 0), ``layer`` (index among attention layers),
``name`` (module path), ``source`` (see above), ``head``, ``seq_len`` (keys ``Tk``), ``n_rows``
(query rows measured: ``B*Tq`` less ``rows_no_key``, the rows that see no key, whose entropy
fields are ``None`` when no row is left), ``entropy_mean`` (over all rows), ``entropy_mean_half`` (over rows with at least
``Tk/2`` visible keys; equals ``entropy_mean`` without masks), ``entropy_min``,
``entropy_max``, ``log_seq_len``, ``sigma`` (``sigma_h``, with the scale; ``None`` without
weights and on forwards that do not check the bound), ``logit_norm_max`` (largest centred logit norm of the checked rows), ``bound_<variant>`` (min over checked
rows of ``h_{T_i}(s_i)``), ``violations_<variant>`` (rows with entropy < bound - tol),
``bound_rows`` (rows checked: the first ``bound_samples`` batch elements; 0 on a forward that
does not check the bound, whose ``sigma``, ``logit_norm_max``, ``bound_*`` and ``violations_*``
are then ``None``), ``rows_nonfinite`` (rows of those whose centred logit norm, measured or a
variant's, is not finite in the compute dtype, as in a diverging model: left out of the check and
of ``bound_rows``, never a lost record or a failed forward; a head with no row left has ``None``
``logit_norm_max`` and ``bound_*``; 0 on a forward that does not check the bound) and
``weight_bound_note`` (why the weight-based variants are ``None`` on a checked forward, else
``None``).  With an
additive (float, not only 0/-inf) attention mask only the ``exact`` variant applies.

Under ``torch.distributed`` every rank runs its own monitor on its own batch and records what one
process records on that batch.  A ``DistributedDataParallel`` model is watched through the
replica it runs (``model.module``: the same layer names as in one process).  Under FSDP2
(``fully_shard``) each attention call is measured inside the forward of the unit that holds the
attention module, where FSDP2 has gathered its parameters, so ``sigma_h`` and the bound use whole
weights.  Where the query/key projections are units of their own (shards again at the call),
the monitor copies their whole parameters in each projection's own forward, on the forwards that
check the bound, and reads the copies at the call; they are dropped when the attention module's
forward ends (:mod:`sigma_core.whole_weights`).  A weight that is still a shard when read is
refused: the entropies and the ``exact`` bound are recorded and the weight-based fields are
``None``, with ``weight_bound_note`` saying why (:data:`sigma_core.capture.SHARDED`).  The monitor
makes no collective and never computes on a ``DTensor`` weight, so ranks may record different
forwards (tests/test_monitor_distributed.py).

How it is built: :mod:`sigma_core.capture` says what a call is (the ways of seeing attention
above, each turned into one :class:`sigma_core.capture.Call`), :mod:`sigma_core.measure` what is
measured (:class:`sigma_core.measure.Measurement`: statistics, ``sigma_h`` and the bound of one
call, as the records below), and :mod:`sigma_core.sinks` where the records go
(:class:`sigma_core.sinks.RecordSink`: ``write(records)``, ``close()``; ``monitor.last`` is an
in-memory sink, ``path=`` a JSON-lines sink, ``sinks=[...]`` adds others; under
``torch.distributed`` only rank 0 writes, except sinks marked ``all_ranks``).  This class wires
them: hooks, layer numbering, the recording schedule and the collapse detector.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from collections import deque
from functools import partial

import numpy as np
import torch
from torch import nn

from sigma_core.adapters import find_adapter
from sigma_core.capture import (
    Adapted, AttentionInterceptor, CompiledForwards, ExecutingModules, _optimized_module_type, in_compiled_call,
    innermost, mha_call, probe_call, sdpa_arguments, sdpa_call, softmax_call, suspended,
)
from sigma_core.measure import BoundViolationWarning, Measurement
from sigma_core.probe import AttentionProbe
from sigma_core.sinks import JsonlSink, MemorySink, SinkSet
from sigma_core.whole_weights import WholeWeights

__all__ = ["EntropyMonitor", "CollapseDetector", "BoundViolationWarning"]

logger = logging.getLogger(__name__)

#: the root hooks and capture callbacks always run eagerly: under torch.compile, a graph break at the
#: start and end of a forward (never inside it), so the forward counter is never traced
_eager = torch.compiler.disable


def _is_int(x) -> bool:
    """An integer (Python or numpy, e.g. ``np.int64``), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


class EntropyMonitor:
    """Record per-head attention entropy and the entropy bound on every ``every``-th forward.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model with softmax attention (see the module docstring for what is seen);
        ``torch.compile(model)`` and ``DistributedDataParallel(model)`` watch the model inside.
    every : int or None
        Record on forwards ``0, every, 2*every, ...`` of ``model`` (counted by a forward
        pre-hook on ``model`` itself).  None: record only the forwards asked for with
        :meth:`record_next` (a training loop's own schedule, as the callbacks of
        :mod:`sigma_core.integrations` keep one record per optimiser step).
    path : str or os.PathLike, optional
        Append each record as one JSON line (``pandas.read_json(path, lines=True)`` reads it):
        a :class:`sigma_core.sinks.JsonlSink`, written by rank 0 only under ``torch.distributed``.
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
    sinks : sequence of sinks, optional
        More destinations for the records (:class:`sigma_core.sinks.RecordSink`: objects with
        ``write(records)`` and ``close()``): each receives the records of every recorded forward,
        the same list as :attr:`last`, after the ``path`` file; :meth:`close` closes them.  A sink
        that raises is turned into a warning.

    Attributes
    ----------
    last : list of dict
        The records of the most recent recorded forward (nothing older is kept).
    events : list of dict
        Collapse events of the most recent forward: the detector's new events after a recorded
        forward, empty after one that does not record (so a loop reading it after every step
        sees each event once).
    skipped : list of dict
        The attention calls of the most recent recorded forward that were *not* recorded, each
        ``{"step", "name", "reason"}`` (an error while measuring, nested tensors, non-finite
        values, a compiled region the monitor cannot see into); empty when everything was.
        Each kind is also warned once.
    n_skipped : int
        Attention calls not recorded since the monitor was attached (every time, not once).
    n_layers : int
        Attention layers seen so far.
    sinks : list
        Where the records go: the in-memory sink behind :attr:`last`, the ``path`` file, then
        ``sinks`` (emptied by :meth:`close`).

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
                 capture: bool = True, fused: bool = True, bound_every: int = 10, native: bool | None = None,
                 sinks=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        opt = _optimized_module_type()
        if opt is not None and isinstance(model, opt):  # torch.compile(model): watch the model inside
            model = model._orig_mod
        if isinstance(model, nn.parallel.DistributedDataParallel):  # DDP(model): the replica it runs
            model = model.module  # (records named as in one process; DDP's forward calls it once)
        if every is not None and (not _is_int(every) or every < 1):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        every = None if every is None else int(every)
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
        if sinks is None:
            sinks = []
        elif callable(getattr(sinks, "write", None)) or isinstance(sinks, (str, bytes)) \
                or not hasattr(sinks, "__iter__"):
            raise TypeError(f"sinks must be a list of sinks, got {type(sinks).__name__}"
                            + (" (pass [sink])" if callable(getattr(sinks, "write", None)) else ""))
        extra = SinkSet(sinks).sinks  # checks each sink before any file is opened
        self._memory = MemorySink(keep=0)
        # the file first: a path that cannot be opened raises before any hook is registered
        self._sinks = SinkSet([self._memory] + ([] if path is None else [JsonlSink(path)]) + extra)
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
        self.events: list[dict] = []
        self._current: list[dict] = []
        self.skipped: list[dict] = []
        self.n_skipped = 0
        self._skipping: list[dict] = []
        self._forwards = 0
        self._asked = False  # record_next() was called: the next forward records
        self._asked_check = None  # ... and checks the bound (None: as bound_every says)
        self._step = -1
        self._active = False
        self._handles = []
        self._handled: dict[int, nn.Module] = {}  # probe/MHA modules by id (recorded by their own hooks)
        self._adapters: dict[int, object] = {}
        self._captured_layers: dict[tuple[str, int], int] = {}
        self._calls: dict[str, int] = {}
        self._warned: set[str] = set()
        self._measure = Measurement(bound_samples=bound_samples, method=method, block_size=block_size,
                                    fused=fused, native=native, warn_once=self._warn_once)
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
        # FSDP2 units inside an attention module (q/k projections sharded on their own): their whole
        # parameters, copied in each unit's forward on the forwards that check the bound
        self._whole = WholeWeights(list(self._handled.values()) + adapted)
        self._stack = (ExecutingModules(model, watched=adapted, opaque=list(self._handled.values()),
                                        on_opaque=self._on_opaque) if capture else None)
        self._compiled_skip = False
        # a model compiled with torch.compile: the recorded forwards run eagerly, the others compiled
        self._compiled = CompiledForwards(model, lambda: self._forwards % self.every == 0)
        if layer == 0 and not capture:
            self.close()
            raise ValueError("model has no supported attention module (probe protocol or "
                             "nn.MultiheadAttention) and capture=False")

    @property
    def last(self) -> list[dict]:
        """The records of the most recent recorded forward (nothing older is kept)."""
        return self._memory.last

    @property
    def sinks(self) -> list:
        """Where the records go (see the class docstring)."""
        return self._sinks.sinks

    @property
    def n_layers(self) -> int:
        """Attention layers known so far (probe/MHA modules, plus captured calls seen)."""
        return self._n_static + len(self._captured_layers)

    def record_next(self, *, check_bound: bool | None = None) -> None:
        """Make the next forward of the model record, whatever ``every`` says.

        With ``every=None`` these are the only forwards that record: the caller keeps the
        schedule (one record per optimiser step under gradient accumulation, none during
        evaluation).  The request is used up by the next forward.

        Parameters
        ----------
        check_bound : bool or None
            Whether that forward checks the bound and computes ``sigma_h``: None (default)
            follows ``bound_every``; True or False decides (a caller whose schedule must not
            depend on how many forwards this monitor has recorded, such as a resumed run).

        Examples
        --------
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
        >>> mon = EntropyMonitor(layer, every=None)
        >>> x = torch.randn(1, 4, 8)
        >>> _ = layer(x); len(mon.last)          # nothing asked: nothing recorded
        0
        >>> mon.record_next(); _ = layer(x); _ = layer(x)
        >>> [r["step"] for r in mon.last]        # the forward after the request (index 1), per head
        [1, 1]
        >>> mon.close()
        """
        if check_bound is not None and not isinstance(check_bound, bool):
            raise TypeError(f"check_bound must be a bool or None, got {type(check_bound).__name__}")
        self._asked = True
        self._asked_check = check_bound

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and close the sinks: the JSON-lines file and ``sinks`` (idempotent)."""
        self._stop_capture()
        if getattr(self, "_whole", None) is not None:
            self._whole.close()
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self, "_compiled", None) is not None:
            self._compiled.close()
        self._sinks.close()

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
            for _ in range(mode.flex_calls):
                self._skip("", "flex_attention: not measured (score_mod/block_mask run inside its compiled kernel)")
            if mode.flex_calls:
                self._seen = True
                self._warn_once("flex", "EntropyMonitor: flex_attention calls are not recorded (their score_mod and "
                                "block_mask run inside flex_attention's own compiled kernel); monitor.skipped counts "
                                "them. Record such steps with SDPA or eager attention (Hugging Face: "
                                "model.set_attn_implementation('sdpa'), same weights), or show q and k through "
                                "the probe protocol.")
            out, self._mode_out = self._mode_out, False
            try:
                if not out:
                    mode.__exit__(None, None, None)
            except Exception as err:  # pragma: no cover - a mode entered inside the forward and left open
                self._warn_once("mode", f"EntropyMonitor: could not leave its torch-function mode: {err}")
        if self._stack is not None:
            self._stack.detach()

    # -- root hooks ----------------------------------------------------------------------------
    @_eager
    def _on_root_pre(self, module, args, kwargs):
        if self._mode is not None:  # a previous forward raised before the post hook could run
            self._stop_capture()
        self.events = []
        self._step = self._forwards
        self._forwards += 1
        self._active = self._asked or (self.every is not None and self._step % self.every == 0)
        asked_check, self._asked, self._asked_check = (self._asked_check if self._asked else None), False, None
        self._check = self._active and (self._recorded % self.bound_every == 0 if asked_check is None
                                        else asked_check)
        self._current = []
        self._skipping = []
        self._calls = {}
        self._seen = False
        self._compiled_skip = False
        if self._active and in_compiled_call():  # compiled code the monitor cannot see into
            self._active, self._compiled_skip = False, True
            self._compiled_found = self._compiled.adopt()
        if self._active:
            self._start_capture(args, kwargs)
        if self._active and self._check:
            self._whole.arm()

    @_eager
    def _on_root_post(self, module, args, output):
        self._stop_capture()
        self._whole.disarm()  # no whole weight outlives the forward
        if self._compiled_skip:
            self._compiled_skip = False
            self._skip("", "the forward ran compiled (torch.compile): attention inside a graph is not seen")
            self.skipped, self._skipping = self._skipping, []
            self._sinks.write([])  # `last` is empty: nothing of this forward was recorded
            self._warn_once("compiled", "EntropyMonitor: a forward to record ran as torch.compile'd code, in "
                            "which the monitor sees no attention: not recorded (monitor.skipped says so each "
                            "time). " + ("The monitor found the compiled module and runs the forwards it records "
                                         "eagerly from the next one on." if self._compiled_found else
                                         "Attach the monitor to the model before compiling it or to the compiled "
                                         "module, or run the recorded steps under "
                                         "torch.compiler.set_stance('force_eager')."))
            return
        if not self._active:
            return
        self._active = False
        self._recorded += 1
        records, self._current = self._current, []
        self.skipped, self._skipping = self._skipping, []
        if not self._seen and output is not None:  # None: the forward raised (or returns nothing)
            self._warn_once("nothing", "EntropyMonitor: the recorded forward made no attention call the monitor "
                            "can see (scaled_dot_product_attention, a softmax over (B, H, Tq, Tk) logits, the "
                            "probe protocol or nn.MultiheadAttention)")
        self._sinks.write(records)  # the memory sink first: `last`
        if self.detector is not None:
            self.events = list(self.detector.update(records))
            for ev in self.events:
                logger.warning("attention entropy collapse: %s", ev)

    # -- one call: capture it, measure it ----------------------------------------------------------
    def _measured(self, layer, name, call, module=None) -> None:
        # ``module``: the attention module of the call; its FSDP2 units' whole weights are read
        with self._whole.substituted(module):
            recs = self._measure(call, step=self._step, layer=layer, name=name, check=self._check)
        if not recs:  # the measurement warned (non-finite queries, keys or logits)
            self._skip(name, "non-finite queries, keys or logits")
        self._current.extend(recs)

    def _skip(self, name: str, reason: str) -> None:
        """Count an attention call that is not recorded (in :attr:`skipped` and :attr:`n_skipped`)."""
        self._skipping.append({"step": self._step, "name": name, "reason": reason})
        self.n_skipped += 1

    def _owner(self):
        """(name, Adapted or None, innermost module or None), or None when a probe/MHA module
        records this call."""
        if self._stack.in_opaque:  # inside a probe/MHA module's forward
            return None
        stack = self._stack.stack()
        name, module = (stack[-1][0], stack[-1][1]) if stack else ("", None)
        entry = next((Adapted(self._adapters[id(m)], m, a, kw) for _, m, a, kw in reversed(stack)
                      if id(m) in self._adapters), None)
        return name, entry, module

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
            self._skip(name, f"{type(err).__name__}: {err}")
            self._warn_once(f"fail:{name}:{type(err).__name__}",
                            f"EntropyMonitor: could not record the attention call in {name or 'model'} "
                            f"at step {self._step}: {type(err).__name__}: {err}")

    @_eager
    def _on_sdpa(self, args, kwargs):
        if not self._active:
            return
        owner = self._owner()
        if owner is None:
            return
        self._seen = True
        self._guarded(owner[0], self._record_sdpa, owner, args, kwargs)

    @_eager
    def _on_softmax(self, logits, probs):
        if not self._active:
            return
        owner = self._owner()
        if owner is None:
            return
        self._seen = True
        self._guarded(owner[0], self._record_softmax, owner, logits)

    def _record_sdpa(self, owner, args, kwargs):
        name, entry, module = owner
        a = sdpa_arguments(args, kwargs)
        if a["query"].is_nested or a["key"].is_nested:
            self._skip(name, "nested tensors")
            self._warn_once(f"nested:{name}", f"EntropyMonitor: {name or 'model'} calls attention on nested "
                            "tensors, which the monitor cannot read: not recorded")
            return
        layer = self._layer_for(name)
        with torch.no_grad():
            self._measured(layer, name, sdpa_call(a, entry, module), None if entry is None else entry.module)

    def _record_softmax(self, owner, logits):
        name, entry, _ = owner
        layer = self._layer_for(name)
        self._measured(layer, name, softmax_call(logits, entry), None if entry is None else entry.module)

    # -- probe and nn.MultiheadAttention hooks ---------------------------------------------------
    def _on_probe(self, layer, name, owner, probe, args, output):
        if not self._active:
            return
        self._seen = True
        with suspended(self._mode):  # the monitor's own arithmetic does not go through the mode
            self._guarded(name, self._record_probe, layer, name, owner, args)

    def _record_probe(self, layer, name, owner, args):
        self._measured(layer, name, probe_call(owner, args), owner)

    def _on_mha(self, layer, name, mod, module, args, kwargs):
        if not self._active:
            return
        self._seen = True
        with suspended(self._mode), torch.no_grad():  # the monitor's own arithmetic does not go through the mode
            self._guarded(name, self._record_mha, layer, name, mod, args, kwargs)

    def _record_mha(self, layer, name, mod, args, kwargs):
        call = mha_call(mod, args, kwargs)
        if call == "sharded":  # q and k would come from an FSDP2 shard of the in-projection
            self._skip(name, "FSDP2 shards: the in-projection is a DTensor at this call")
            self._warn_once(f"sharded:{name}", f"EntropyMonitor: {name or 'model'} (nn.MultiheadAttention) holds "
                            "FSDP2 shards of its in-projection when it runs (sharded as a unit of its own "
                            "inside it?): not recorded; fully_shard the layer or block that holds it")
            return
        if isinstance(call, str):  # nested tensors: the fused inference path of nn.TransformerEncoder
            self._skip(name, "nested tensors")
            self._warn_once(f"nested:{name}", f"EntropyMonitor: {name or 'model'} receives nested tensors "
                            "(the fast path of nn.TransformerEncoder with a padding mask): not recorded")
            return
        self._measured(layer, name, call, mod)


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
            if v is None:  # every row of the head was padding: nothing measured
                continue
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
