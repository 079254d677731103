"""Whole weights of FSDP2 units inside an attention module, kept for the monitor's ``sigma_h``.

When ``fully_shard`` makes the query/key projections units of their own, FSDP2 gathers a unit's
parameters in its forward pre-hook (registered with ``prepend=True``) and frees them in its
forward hook (registered with ``prepend=False``; torch/distributed/fsdp/_fully_shard/_fsdp_state.py,
``FSDPState.init``): by the time the attention call runs, the projections hold shards
(``DTensor``), and computing on them may start a collective that only the ranks recording would
enter.  :class:`WholeWeights` registers, on the forwards that check the bound only, a forward hook
with ``prepend=True`` on each FSDP2 unit strictly inside a watched attention module.  It runs after
the unit's forward and before FSDP2's own forward hook, whatever the order in which the monitor and
``fully_shard`` were applied, so the unit's parameters are whole there (under sigmaReparam the raw
weight, its ``gamma`` and the power-iteration buffers after this forward's step: the parametrised
weight is evaluated from them as in one process).  It copies them; at the attention call the
monitor puts the copies in place of the shards while it reads the weights (:meth:`substituted`),
then puts the shards back.  The copies are dropped when the attention module's forward ends (and
at the end of the model's forward): no whole weight outlives the forward, and units that run
after the module's attention call (the output projection) are not copied.  No collective is made.

A weight read that still meets a shard (a unit whose parameters were not whole in the hook, or a
bound source reading outside the attention module) is refused before the operation runs
(:func:`refusing_shards`): the monitor then records ``weight_bound_note`` =
:data:`sigma_core.capture.SHARDED`, never a shard's sigma.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["ShardRead", "WholeWeights", "holds_shard", "refusing_shards"]


def _sharding_types():
    """``(DTensor, FSDPModule)``; ``(None, None)`` without an initialised process group (no shard
    can exist then: a ``DeviceMesh`` needs one), so one process pays nothing."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None, None
    from sigma_core.reparam import _sharding_types as types  # noqa: PLC0415  (torch.distributed on first use)

    return types()


class ShardRead(RuntimeError):
    """An operation on an FSDP2 shard (``DTensor``) was refused (:func:`refusing_shards`)."""


class _RefuseShards(TorchFunctionMode):
    def __init__(self, dtensor):
        super().__init__()
        self._dtensor = dtensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, self._dtensor) for a in tree_leaves((args, kwargs))):
            raise ShardRead(f"{getattr(func, '__name__', func)} on an FSDP2 shard (DTensor)")
        return func(*args, **kwargs)


@contextmanager
def refusing_shards():
    """Raise :class:`ShardRead` before any torch operation on a ``DTensor`` runs inside (so no
    collective starts); a no-op without an initialised process group.

    >>> with refusing_shards():
    ...     float(torch.ones(2).sum())
    2.0
    """
    dtensor, _ = _sharding_types()
    if dtensor is None:
        yield
        return
    with _RefuseShards(dtensor):
        yield


def holds_shard(tensors) -> bool:
    """Whether one of ``tensors`` (None entries ignored) is a ``DTensor``."""
    dtensor, _ = _sharding_types()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


class WholeWeights:
    """Copies of the whole parameters of the FSDP2 units inside ``attention`` modules, taken in
    each unit's forward on the forwards between :meth:`arm` and :meth:`disarm` (module docstring).

    ``peak_bytes``: the most bytes of copies held at once since construction.
    """

    def __init__(self, attention: Iterable[nn.Module]):
        self._attention = list(attention)
        self._handles: list = []
        self._stash: dict[int, dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]]] = {}
        self._done: set[int] = set()  # attention modules whose call has read the copies
        self._bytes = 0
        self.peak_bytes = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of copies held now."""
        return self._bytes

    def arm(self) -> None:
        """Hook the FSDP2 units inside the attention modules for this forward (none: nothing)."""
        self.disarm()
        _, unit_type = _sharding_types()
        if unit_type is None:
            return
        for att in self._attention:
            units = [m for m in att.modules() if m is not att and isinstance(m, unit_type)]
            for unit in units:  # before FSDP2's forward hook (prepend=False), after the unit's forward
                self._handles.append(unit.register_forward_hook(partial(self._on_unit, att), prepend=True))
            if units:
                self._handles.append(att.register_forward_hook(partial(self._on_attention_end, att),
                                                               always_call=True))

    def disarm(self) -> None:
        """Remove this forward's hooks and drop every copy."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stash = {}
        self._done = set()
        self._bytes = 0

    close = disarm

    @torch.compiler.disable
    def _on_unit(self, att, unit, args, output) -> None:
        if id(att) in self._done:  # runs after the attention call (an output projection): not needed
            return
        dtensor, _ = _sharding_types()
        kept = self._stash.setdefault(id(att), {})
        with torch.no_grad():
            for mod in unit.modules():
                for name, p in mod._parameters.items():
                    if p is None or isinstance(p, dtensor):  # a shard here: not kept (the read is refused)
                        continue
                    old = kept.get((id(mod), name))
                    if old is not None:
                        self._bytes -= old[2].nbytes
                    copy = p.detach().clone()
                    kept[(id(mod), name)] = (mod, name, copy)
                    self._bytes += copy.nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    @torch.compiler.disable
    def _on_attention_end(self, att, module, args, output) -> None:
        for _, _, t in self._stash.pop(id(att), {}).values():
            self._bytes -= t.nbytes

    @contextmanager
    def substituted(self, att: nn.Module | None):
        """The copies of ``att``'s units in place of their shards inside (the shards back after)."""
        kept = self._stash.get(id(att)) if att is not None else None
        if not kept:
            yield
            return
        self._done.add(id(att))
        saved = [(mod, name, mod._parameters[name]) for mod, name, _ in kept.values()]
        try:
            for mod, name, copy in kept.values():
                mod._parameters[name] = copy
            yield
        finally:
            for mod, name, p in saved:
                mod._parameters[name] = p
