"""See the attention calls a model makes, while (and only while) a monitor records.

:class:`AttentionInterceptor` is a :class:`torch.overrides.TorchFunctionMode`: entered for one
recorded forward and exited right after it, it sees every
:func:`torch.nn.functional.scaled_dot_product_attention` call (Hugging Face ``sdpa``,
x-transformers, timm, most new code) and every softmax over the last axis of a 4-D tensor (the
``(B, H, Tq, Tk)`` logits of an eager attention: Hugging Face ``eager``, x-transformers without
flash).  It hands the arguments (and, for a softmax, its output) to callbacks and returns exactly
what the function returns: the model computes the same numbers.  Nothing global is patched, and
outside a recorded forward no mode is active, so an unobserved forward pays nothing.

:class:`ModuleStack` knows, during the recorded forward, which modules are executing (forward
pre-hooks push, forward hooks with ``always_call=True`` pop), so a captured call is attributed to
the innermost module by its qualified name.  Its hooks exist only during the recorded forward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionInterceptor", "ModuleStack", "SDPA_ARGS", "sdpa_arguments", "softmax_input", "suspended"]

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


@contextlib.contextmanager
def suspended(mode: TorchFunctionMode | None):
    """Leave ``mode`` for the body (the monitor's own arithmetic in a hook) when it is the innermost
    torch-function mode, and enter it again after; otherwise (None, or another mode on top) do nothing."""
    n = torch._C._len_torch_function_stack()
    if mode is None or n == 0 or torch._C._get_function_stack_at(n - 1) is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


class ModuleStack:
    """The modules of ``model`` now executing, innermost last, as ``(name, module, args, kwargs)``.

    ``attach()`` registers the push/pop hooks on every submodule, ``detach()`` removes them.
    ``args``/``kwargs`` are kept only while the module runs (they are the module's inputs).
    """

    def __init__(self, model: nn.Module):
        self._root = model
        self._modules = [(name, mod) for name, mod in model.named_modules() if mod is not model]
        self.stack: list[tuple[str, nn.Module, tuple, dict]] = []
        self._handles: list = []

    def attach(self, root_args: tuple = (), root_kwargs: dict | None = None) -> None:
        """Hook every submodule; the root (already running) enters the stack with its arguments."""
        self.detach()
        self.stack = [("", self._root, root_args, root_kwargs or {})]
        for name, mod in self._modules:
            self._handles.append(mod.register_forward_pre_hook(
                self._pusher(name), with_kwargs=True, prepend=True))
            self._handles.append(mod.register_forward_hook(self._pop, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.stack = []

    def _pusher(self, name):
        def push(module, args, kwargs):
            self.stack.append((name, module, args, kwargs))
        return push

    def _pop(self, module, args, output):
        # pop this module's entry (the innermost one of it); tolerate a stack left by an exception
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][1] is module:
                del self.stack[i:]
                return
