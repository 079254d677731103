"""See the attention calls a model makes, while (and only while) a monitor records.

:class:`AttentionInterceptor` is a :class:`torch.overrides.TorchFunctionMode`: entered for one
recorded forward and exited right after it, it sees every
:func:`torch.nn.functional.scaled_dot_product_attention` call (Hugging Face ``sdpa``,
x-transformers, timm, most new code) and every softmax over the last axis of a 4-D tensor (the
``(B, H, Tq, Tk)`` logits of an eager attention: Hugging Face ``eager``, x-transformers without
flash).  It hands the arguments (and, for a softmax, its output) to callbacks and returns exactly
what the function returns: the model computes the same numbers.  Nothing global is patched, and
outside a recorded forward no mode is active, so an unobserved forward pays nothing.

:class:`ExecutingModules` finds, at a captured call, which modules of the model are executing
(those with a method on the Python call stack), so the call is attributed to the innermost one
by its qualified name; it does its work only at a captured call, not at every module call.

What a call is, for the measurement (:mod:`sigma_core.measure`): :class:`Call` holds the queries
and keys (or, for an eager softmax, the logits) of one attention call in one layout, ``(B, H, T,
d_head)`` with key heads repeated for grouped-query attention, with its scale, causality and
mask, and says lazily (only when the bound is checked) where the weight-based bound variants get
``W_Q``, ``W_K`` and the tokens: :class:`Weights` known from the module (probe protocol,
``nn.MultiheadAttention``), :class:`Adapted` from an adapter of :mod:`sigma_core.adapters` (to be
checked against the logits actually used), or a sentence saying why they do not apply.
:func:`sdpa_call`, :func:`softmax_call`, :func:`probe_call` and :func:`mha_call` build it from
what each way of seeing attention receives.  A new way of seeing attention is one more such
function (and a hook in the monitor that calls it).
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sigma_core.entropy import _hidden_threshold

__all__ = ["Adapted", "AttentionInterceptor", "Call", "CompiledForwards", "ExecutingModules", "SDPA_ARGS", "SHARDED",
           "Weights", "mha_call", "packed_query_heads", "probe_call", "sdpa_arguments", "sdpa_call", "sharded",
           "softmax_call", "softmax_input", "suspended"]

#: positional order of the arguments of scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch._C.TensorBase.softmax}
try:  # the operator behind torch.nn.attention.flex_attention (not measured: counted, see the monitor)
    from torch._higher_order_ops.flex_attention import flex_attention as _FLEX
except Exception:  # pragma: no cover - a build without it
    _FLEX = None


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """The arguments of a scaled_dot_product_attention call by name, with SDPA's defaults."""
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(zip(SDPA_ARGS, args))
    out.update(kwargs)
    return out


def softmax_input(args: tuple, kwargs: dict):
    """The input of a softmax call when it normalises the last axis of a 4-D tensor, else None."""
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    if dim not in (-1, 3):
        return None
    return x


class AttentionInterceptor(TorchFunctionMode):
    """Calls ``on_sdpa(args, kwargs)`` before each SDPA call and ``on_softmax(logits, probs)``
    after each last-axis softmax of a 4-D tensor; returns each function's own result.  Calls of
    ``torch.nn.attention.flex_attention`` are counted in :attr:`flex_calls` (their operator runs
    inside a region flex_attention compiles itself, where no callback may run)."""

    def __init__(self, on_sdpa, on_softmax):
        super().__init__()
        self.on_sdpa = on_sdpa
        self.on_softmax = on_softmax
        self.flex_calls = 0  # flex_attention calls seen (inside its own compiled region: only counted)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _FLEX and _FLEX is not None:
            self.flex_calls += 1
            return func(*args, **kwargs)
        if func in _SDPA:
            self.on_sdpa(args, kwargs)
            return func(*args, **kwargs)
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            logits = softmax_input(args, kwargs)
            if logits is not None:
                self.on_softmax(logits, out)
            return out
        return func(*args, **kwargs)


def innermost(mode: TorchFunctionMode | None) -> bool:
    """Whether ``mode`` is the innermost active torch-function mode (False for None)."""
    n = torch._C._len_torch_function_stack()
    return mode is not None and n > 0 and torch._C._get_function_stack_at(n - 1) is mode


@contextlib.contextmanager
def suspended(mode: TorchFunctionMode | None):
    """Leave ``mode`` for the body (the monitor's own arithmetic in a hook) when it is the innermost
    torch-function mode, and enter it again after; otherwise (None, or another mode on top) do nothing."""
    if not innermost(mode):
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


class ExecutingModules:
    """Which modules of ``model`` are executing at a given moment, read from the Python call stack.

    A module is executing while one of its methods (its ``forward``, or a helper it calls) has a
    frame on the call stack; :meth:`stack` lists them innermost last as ``(name, module, args,
    kwargs)``, named by their qualified name in ``model``.  Nothing runs until :meth:`stack` is
    called (the monitor calls it only at a captured attention call), so a forward pays nothing
    for it.  ``args``/``kwargs`` (the inputs of the module's current forward call) are kept only
    for the ``watched`` modules, by forward pre-hooks registered by :meth:`attach` and removed by
    :meth:`detach` (the monitor attaches for one recorded forward); other modules get ``((), {})``.
    :attr:`in_opaque` counts the ``opaque`` modules now running their forward (the monitor's
    probe and ``nn.MultiheadAttention`` modules, which record their attention themselves), so a
    call inside them is dismissed without reading the call stack.  ``on_opaque(True)`` is called
    when the outermost of them starts and ``on_opaque(False)`` when it ends (the monitor leaves its
    torch-function mode in between: nothing inside is recorded from it, and every torch call
    there would pay for the mode's dispatch).
    """

    def __init__(self, model: nn.Module, watched=(), opaque=(), on_opaque=None):
        self._root = model
        self._names = {id(mod): name for name, mod in model.named_modules()}
        self._watched = list(watched)
        self._opaque = list(opaque)
        self._args: dict[int, tuple[tuple, dict]] = {}
        self._handles: list = []
        self._on_opaque = on_opaque
        self.in_opaque = 0

    def attach(self, root_args: tuple = (), root_kwargs: dict | None = None) -> None:
        """Keep the forward arguments of the watched modules (and of the root, already running)."""
        self.detach()
        self._args[id(self._root)] = (root_args, root_kwargs or {})
        for mod in self._watched:
            self._handles.append(mod.register_forward_pre_hook(self._keep, with_kwargs=True, prepend=True))
        for mod in self._opaque:
            self._handles.append(mod.register_forward_pre_hook(self._enter, prepend=True))
            self._handles.append(mod.register_forward_hook(self._leave, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._args = {}
        self.in_opaque = 0

    @torch.compiler.disable
    def _enter(self, module, args):
        self.in_opaque += 1
        if self.in_opaque == 1 and self._on_opaque is not None:
            self._on_opaque(True)

    @torch.compiler.disable
    def _leave(self, module, args, output):
        if self.in_opaque == 0:
            return
        self.in_opaque -= 1
        if self.in_opaque == 0 and self._on_opaque is not None:
            self._on_opaque(False)

    @torch.compiler.disable
    def _keep(self, module, args, kwargs):
        self._args[id(module)] = (args, kwargs)

    def stack(self) -> list[tuple[str, nn.Module, tuple, dict]]:
        """The modules of ``model`` with a method on the call stack now, innermost last."""
        found = []
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":  # a method: is its self ours?
                obj = frame.f_locals.get("self")
                name = self._names.get(id(obj))
                if name is not None and (not found or found[-1][1] is not obj):
                    found.append((name, obj, *self._args.get(id(obj), ((), {}))))
                    if obj is self._root:
                        break
            frame = frame.f_back
        found.reverse()
        return found


# -- torch.compile -------------------------------------------------------------------------------
def _optimized_module_type():
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - a build without dynamo
        return None
    return OptimizedModule


def _forced_eager() -> bool:
    try:
        return torch._dynamo.eval_frame._stance.stance == "force_eager"
    except Exception:  # pragma: no cover - an older/newer layout: assume not
        return False


def in_compiled_call() -> bool:
    """Whether the caller runs inside a call that ``torch.compile`` compiles (a ``compile_wrapper``
    frame of ``torch._dynamo.eval_frame`` on the call stack, and the compiler not forced eager)."""
    if _forced_eager():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith(("_dynamo/eval_frame.py",
                                                                              "_dynamo\\eval_frame.py")):
            return True
        frame = frame.f_back
    return False


class CompiledForwards:
    """Run the forwards a monitor records eagerly when ``model`` is compiled with ``torch.compile``.

    Under ``torch.compile`` the monitor cannot see attention calls (they are inside a graph), and
    tracing its torch-function mode breaks Dynamo on many models.  So a recorded forward runs with
    ``torch.compiler.set_stance("force_eager")`` (the model's own eager code, the records of an
    eager model) and every other forward runs the compiled graph untouched.  The stance is set
    where a forward begins *outside* the compiled code: a forward pre-hook on each
    ``torch.compile(model)`` wrapper (``OptimizedModule``, found from ``model`` through the
    garbage collector's objects when attached, or later on the call stack by :meth:`adopt`), and a wrapper
    around ``model._compiled_call_impl`` for ``model.compile()``.  ``due()`` says whether the next
    forward of ``model`` records.  :meth:`close` removes all of it.
    """

    def __init__(self, model: nn.Module, due: Callable[[], bool]):
        self._model = model
        self._due = due
        self._handles: list = []
        self._wrappers: set[int] = set()
        self._stance = None
        self._inplace = None  # (the original _compiled_call_impl, our wrapper)
        opt = _optimized_module_type()
        if opt is not None:  # torch.compile(model) wrappers made before the monitor: one pass over the heap
            for obj in gc.get_objects():
                if issubclass(type(obj), opt) and obj._modules.get("_orig_mod") is model:  # (no proxy touched)
                    self.hook(obj)
        self.adopt_inplace()

    @property
    def wrapped(self) -> bool:
        """Whether a compiled entry point of the model is handled."""
        return bool(self._wrappers) or self._inplace is not None

    def hook(self, wrapper: nn.Module) -> None:
        """Force eager execution of the recorded forwards that enter through ``wrapper``."""
        if id(wrapper) in self._wrappers:
            return
        self._wrappers.add(id(wrapper))
        self._handles.append(wrapper.register_forward_pre_hook(self._enter, prepend=True))
        self._handles.append(wrapper.register_forward_hook(self._leave, always_call=True))

    def adopt_inplace(self) -> bool:
        """Wrap ``model._compiled_call_impl`` (set by ``model.compile()``) if not done yet."""
        impl = self._model.__dict__.get("_compiled_call_impl")
        if impl is None or (self._inplace is not None and impl is self._inplace[1]):
            return False

        def call(*args, **kwargs):
            self._enter(None, args)
            try:
                return impl(*args, **kwargs)
            finally:
                self._leave(None, args, None)

        self._inplace = (impl, call)
        self._model._compiled_call_impl = call
        return True

    def adopt(self) -> bool:
        """Called inside a compiled forward the monitor was not told of: hook the
        ``torch.compile(model)`` wrapper found on the call stack (or ``model.compile()``), so that
        the next recorded forwards run eagerly.  Whether one was found."""
        found = self.adopt_inplace()
        opt = _optimized_module_type()
        frame = sys._getframe(1)
        while frame is not None and opt is not None:
            obj = frame.f_locals.get("self") if frame.f_code.co_argcount else None
            if isinstance(obj, opt) and getattr(obj, "_orig_mod", None) is self._model:
                self.hook(obj)
                found = True
            frame = frame.f_back
        return found

    def _enter(self, module, args):
        if self._stance is None and self._due():
            self._stance = torch.compiler.set_stance("force_eager")  # applied now; undone in _leave

    def _leave(self, module, args, output):
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(None, None, None)

    def close(self) -> None:
        self._leave(None, (), None)
        for h in self._handles:
            h.remove()
        self._handles = []
        self._wrappers = set()
        if self._inplace is not None:
            impl, call = self._inplace
            if self._model.__dict__.get("_compiled_call_impl") is call:
                self._model._compiled_call_impl = impl
            self._inplace = None


# -- what a call is -------------------------------------------------------------------------------
class Weights(NamedTuple):
    """Per-head weights and tokens of a call, theory convention ``q_h = x_q @ w_q[h]``.

    ``w_q``, ``w_k``: ``(H, d, d_head)``; ``x_q``: ``(B, Tq, d)``; ``x_k``: ``(B, Tk, d)``, or None
    when the keys come from ``x_q`` (self-attention); ``scale``: the logit scale.
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    scale: float
    x_q: torch.Tensor
    x_k: torch.Tensor | None


class Adapted(NamedTuple):
    """An adapter of :mod:`sigma_core.adapters` for ``module``, with the module's forward inputs."""

    adapter: Callable
    module: nn.Module
    args: tuple
    kwargs: dict


#: where the weight-based bound variants come from: known weights, an adapter to check, or why not
BoundSource = Union[Weights, Adapted, str]

NO_ADAPTER = "no adapter for this attention module (sigma_core.adapters)"
SHARDED = ("the query/key weights read at this call were FSDP2 shards (DTensor), not whole in their own unit's "
           "forward either (sigma_core.whole_weights): the read was refused, never a shard's sigma; fully_shard "
           "the attention module or its block as one unit for sigma_h and the weight-based bounds (the monitor "
           "never gathers: no collective a rank could wait on)")
ADDITIVE_MASK = "additive attention mask (a bias on the logits)"
QK_NORM = "QK-normalisation: the logits are formed from normalised q, k, not from x W"


@dataclass
class Call:
    """One attention call as the measurement sees it.

    Attributes
    ----------
    source : str
        How it was seen: ``"sdpa"``, ``"softmax"``, ``"probe"`` or ``"mha"``.
    q, k : Tensor or None
        ``(B, H, Tq, d_head)`` and ``(B, H, Tk, d_head)`` (key heads repeated), before the scale;
        None for ``"softmax"``.
    logits : Tensor or None
        ``(B, H, Tq, Tk)``, the scaled logits of an eager softmax (mask included); else None.
    scale : float
        The logit scale.
    causal : bool
        Query ``i`` sees keys ``0..i``.
    mask : Tensor or None
        Bool (True = attend) or an additive float mask, broadcastable to ``(B, H, Tq, Tk)``.
    bound : callable
        ``bound()`` returns the :data:`BoundSource` of the weight-based bound variants; called
        only on forwards that check the bound.
    fused : bool
        Whether the entropies may come from the fast path
        (:func:`sigma_core.entropy.fused_row_entropy`); ``nn.MultiheadAttention`` calls take the
        blocked pass.
    """

    source: str
    q: torch.Tensor | None
    k: torch.Tensor | None
    logits: torch.Tensor | None
    scale: float
    causal: bool
    mask: torch.Tensor | None
    bound: Callable[[], BoundSource]
    fused: bool = True

    @property
    def n_keys(self) -> int:
        """``Tk``, the number of keys."""
        return self.logits.shape[3] if self.logits is not None else self.k.shape[2]


def sharded(module: nn.Module | None, tensors=None) -> bool:
    """Whether a parameter of ``module`` (or of a submodule; or one of ``tensors`` when given,
    None entries ignored) is a ``DTensor`` now: an FSDP2 shard.

    Inside the forward of the ``fully_shard`` unit that holds them, FSDP2 has replaced a unit's
    parameters with gathered plain tensors, so an attention module sharded with its block (or as
    its own unit) reads whole weights at its attention call.  Projections sharded as units of
    their own are shards again by then; the monitor reads the whole copies taken in their own
    forward (:mod:`sigma_core.whole_weights`), and refuses any operation on a shard (it may start
    a collective that only the ranks recording would enter): :data:`SHARDED`.
    ``nn.MultiheadAttention`` recomputes ``q``, ``k`` from its in-projection, checked with this.

    >>> sharded(nn.Linear(2, 2)), sharded(None)
    (False, False)
    """
    if module is None:
        return False
    from sigma_core.reparam import _sharding_types  # noqa: PLC0415  (imports torch.distributed on first use)

    dtensor, _ = _sharding_types()
    found = module.parameters() if tensors is None else tensors
    return dtensor is not None and any(isinstance(p, dtensor) for p in found)


def pure_mask(mask: torch.Tensor | None) -> bool:
    """True when ``mask`` only hides keys (bool, or float of 0 and -inf/finfo.min-like values)."""
    if mask is None or mask.dtype == torch.bool:
        return True
    hidden = mask <= _hidden_threshold(mask.dtype)
    return not bool(torch.where(hidden, 0, mask).any())


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention convention (bool True = do NOT attend) -> additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


def packed_query_heads(module: nn.Module | None, q: torch.Tensor, k: torch.Tensor) -> int:
    """How many query heads a grouped-query decoding call packed into its query axis, else 1.

    To decode one token with a mask, Hugging Face (``pack_gqa`` of
    ``transformers.integrations.sdpa_attention``) runs SDPA on the key heads, with the
    ``g = num_key_value_groups`` query heads sharing key head ``j`` as ``g`` query rows:
    ``(B, H, 1, d)`` becomes ``(B, H / g, g, d)``.  Recognised from the module making the call
    (``num_key_value_groups = g > 1`` and ``config.num_attention_heads = H``):
    a call with ``H / g`` heads of queries and keys and exactly ``g`` query rows.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> mod = nn.Module(); mod.num_key_value_groups = 2
    >>> mod.config = SimpleNamespace(num_attention_heads=4)
    >>> packed_query_heads(mod, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 5, 8))  # 4 heads packed
    2
    >>> packed_query_heads(mod, torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 5, 8))  # enable_gqa layout
    1
    """
    g = getattr(module, "num_key_value_groups", None)
    if not isinstance(g, int) or g < 2 or q.dim() != 4 or k.dim() != 4:
        return 1
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or q.shape[1] != k.shape[1] or q.shape[2] != g or heads != q.shape[1] * g:
        return 1  # (without the module's head count a prefill of g tokens would look the same)
    return g


def sdpa_call(a: dict, adapted: Adapted | None, module: nn.Module | None = None) -> Call:
    """The :class:`Call` of a ``scaled_dot_product_attention`` call with arguments ``a``
    (:func:`sdpa_arguments`; not nested tensors): 3-D inputs are one head, extra batch dimensions
    are folded into the heads, grouped-query key heads are repeated (ValueError when the query
    heads are not a multiple of them), and query heads packed into the query axis by grouped-query
    decoding (:func:`packed_query_heads` of ``module``, the innermost module making the call) are
    unpacked, so that heads are always query heads.  ``adapted``: the adapter of the module."""
    q, k, mask = a["query"].detach(), a["key"].detach(), a["attn_mask"]
    g = packed_query_heads(module, q, k)
    if g > 1:  # (B, Hk, g, d) -> (B, Hk * g, 1, d): query head j * g + r is row r of key head j
        B, Hk = q.shape[:2]
        q = q.reshape(B, Hk * g, 1, q.shape[-1])
        k = k.repeat_interleave(g, dim=1)
        if mask is not None and mask.dim() == 4:
            if mask.shape[1] == Hk and mask.shape[2] == g:  # a per-head mask, packed the same way
                mask = mask.reshape(mask.shape[0], Hk * g, 1, mask.shape[-1])
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

    def bound():
        if not pure_mask(mask):
            return ADDITIVE_MASK
        return _adapted_or_why(adapted)

    return Call("sdpa", q, k, None, scale, bool(a["is_causal"]), mask, bound)


def softmax_call(logits: torch.Tensor, adapted: Adapted | None) -> Call:
    """The :class:`Call` of a softmax over the last axis of ``(B, H, Tq, Tk)`` logits."""
    return Call("softmax", None, None, logits.detach(), 1.0, False, None, lambda: _adapted_or_why(adapted))


def _adapted_or_why(adapted: Adapted | None) -> BoundSource:
    """``adapted``, or why the weight-based variants do not apply (no adapter, sharded weights)."""
    if adapted is None:
        return NO_ADAPTER
    return adapted  # (weights read from FSDP2 shards: SHARDED, sigma_core.whole_weights.refusing_shards)


def probe_call(owner: nn.Module, args: tuple) -> Call:
    """The :class:`Call` seen by a probe (:mod:`sigma_core.probe`): ``args = (x, q, k[, x_k])`` and
    the protocol attributes of the ``owner`` module."""
    x, q, k = args[:3]
    x_k = args[3] if len(args) > 3 else None  # cross-attention: the key-side tokens
    scale = float(owner.scale)

    def bound():
        if not getattr(owner, "weight_bounds_valid", True):  # QK-LayerNorm: logits not x W_Q W_K^T x^T
            return QK_NORM
        w_q, w_k = owner.head_weights()
        return Weights(w_q, w_k, scale, x, x_k)

    return Call("probe", q, k, None, scale, bool(owner.causal), None, bound)


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def mha_call(mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Call | str:
    """The :class:`Call` of ``nn.MultiheadAttention`` ``mod`` about to run on ``args``/``kwargs``
    (its forward pre-hook's), with ``q``, ``k`` recomputed from the in-projection; ``"nested"``
    when the inputs are nested tensors, ``"sharded"`` when the in-projection is an FSDP2 shard
    (:func:`sharded`)."""
    ba = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
    ba.apply_defaults()
    a = ba.arguments
    query, key = a["query"], a["key"]
    if query.is_nested or key.is_nested:  # the fused inference path of nn.TransformerEncoder
        return "nested"
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
    if sharded(mod, (mod.in_proj_weight, mod.q_proj_weight, mod.k_proj_weight, mod.in_proj_bias)):
        return "sharded"  # q and k are recomputed from the in-projection: never from a shard
    bq = bk = None
    if mod.in_proj_bias is not None:
        bq, bk = mod.in_proj_bias[:E], mod.in_proj_bias[E:2 * E]
    q = F.linear(xq, wq, bq).view(N, L, H, dh).transpose(1, 2)  # (N, H, L, dh)
    k = F.linear(xk, wk, bk).view(N, S, H, dh).transpose(1, 2)  # (N, H, S, dh)
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
    if mask is not None and pure_mask(mask):
        mask = mask > _hidden_threshold(mask.dtype)  # pure masking: bool, True = attend
    self_attention = a["query"] is a["key"]

    def bound():
        if mask is not None and mask.dtype != torch.bool:
            return ADDITIVE_MASK
        # theory convention q_h = x @ W_Q[h]: (H, d, dh); biases as an extra input row
        w_q = wq.detach().view(H, dh, -1).transpose(1, 2)
        w_k = wk.detach().view(H, dh, -1).transpose(1, 2)
        x_q, x_k = xq, xk
        if bq is not None:
            w_q = torch.cat([w_q, bq.detach().view(H, 1, dh)], 1)
            w_k = torch.cat([w_k, bk.detach().view(H, 1, dh)], 1)
            x_q = torch.cat([xq, xq.new_ones(N, L, 1)], -1)
            x_k = torch.cat([xk, xk.new_ones(N, S, 1)], -1)
        return Weights(w_q, w_k, 1.0 / math.sqrt(dh), x_q, None if self_attention else x_k)

    return Call("mha", q, k, None, 1.0 / math.sqrt(dh), causal, mask, bound, fused=False)
