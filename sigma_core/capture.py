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
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionInterceptor", "ExecutingModules", "SDPA_ARGS", "sdpa_arguments", "softmax_input", "suspended"]

#: positional order of the arguments of scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch._C.TensorBase.softmax}


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
    after each last-axis softmax of a 4-D tensor; returns each function's own result."""

    def __init__(self, on_sdpa, on_softmax):
        super().__init__()
        self.on_sdpa = on_sdpa
        self.on_softmax = on_softmax

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
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

    def _enter(self, module, args):
        self.in_opaque += 1
        if self.in_opaque == 1 and self._on_opaque is not None:
            self._on_opaque(True)

    def _leave(self, module, args, output):
        if self.in_opaque == 0:
            return
        self.in_opaque -= 1
        if self.in_opaque == 0 and self._on_opaque is not None:
            self._on_opaque(False)

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
