"""Where the monitor's records go: one small interface, :class:`RecordSink`.

A sink has two methods: ``write(records)``, called once per recorded forward with that forward's
records (a list of plain dicts, one per layer and head, as listed in :mod:`sigma_core.monitor`;
a sink must not modify them), and ``close()``, called once by
:meth:`EntropyMonitor.close() <sigma_core.monitor.EntropyMonitor.close>`.  Any object with these
two methods is a sink (:class:`RecordSink` is a convenient base); pass it as
``EntropyMonitor(model, sinks=[...])``.

- :class:`MemorySink` keeps the records in memory (``monitor.last`` reads the monitor's own);
- :class:`JsonlSink` appends one JSON line per record (``EntropyMonitor(path=...)``).

A sink that raises never fails the model's forward: :class:`SinkSet` turns its error into a
warning (once per sink and error type) and the other sinks still receive the records.

One writer under ``torch.distributed``: every rank runs the same monitor, so a sink that writes
shared output (a file, a logger) receives records only on the writer rank (:func:`is_writer`:
rank 0 of the default process group when one is initialised; every process otherwise).  A sink
whose ``all_ranks`` attribute is True receives every rank's records (:class:`MemorySink`, so each
rank's ``monitor.last`` holds its own; ``JsonlSink(path, per_rank=True)``, one file per rank).
This rule lives in :class:`SinkSet` alone, so a new sink is one class with ``write`` and
``close`` and nothing about ranks.

Examples
--------
>>> class Count(RecordSink):
...     def __init__(self):
...         self.n = 0
...     def write(self, records):
...         self.n += len(records)
>>> sinks = SinkSet([MemorySink(), Count()])
>>> sinks.write([{"layer": 0, "head": 0}, {"layer": 0, "head": 1}])
>>> sinks.sinks[1].n, len(sinks.sinks[0].last)
(2, 2)
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import deque

import numpy as np
import torch

__all__ = ["JsonlSink", "MemorySink", "RecordSink", "SinkSet", "entropy_grid", "is_writer", "record_scalars"]

#: the bound variants of the records, weakest first (sigma_core.entropy.VARIANTS, without importing it)
_VARIANTS = ("theorem", "per_query", "centered", "exact")


def is_writer() -> bool:
    """Whether this process writes shared output: rank 0 of the default ``torch.distributed``
    process group when one is initialised, else True.

    >>> is_writer()  # no process group here
    True
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RecordSink:
    """Base of a record sink: override :meth:`write` (and :meth:`close` if it holds a resource).

    Attributes
    ----------
    all_ranks : bool
        False (the default): under ``torch.distributed`` the sink receives records only on the
        writer rank (:func:`is_writer`).  True: on every rank.
    """

    all_ranks: bool = False

    def write(self, records: list[dict]) -> None:
        """Take the records of one recorded forward (do not modify them)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds; called once, when the monitor closes."""
        return None


class MemorySink(RecordSink):
    """Keep records in memory.

    Parameters
    ----------
    keep : int or None
        How many recorded forwards :attr:`history` keeps (None: all; 0: none, only :attr:`last`).

    Attributes
    ----------
    last : list of dict
        The records of the latest write.
    history : collections.deque of list of dict
        The records of the latest ``keep`` writes, oldest first.

    Examples
    --------
    >>> mem = MemorySink(keep=2)
    >>> for step in range(3):
    ...     mem.write([{"step": step}])
    >>> mem.last, [recs[0]["step"] for recs in mem.history]
    ([{'step': 2}], [1, 2])
    """

    all_ranks = True

    def __init__(self, keep: int | None = None):
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
            raise ValueError(f"keep must be a non-negative int or None, got {keep!r}")
        self.last: list[dict] = []
        self.history: deque = deque(maxlen=keep)

    def write(self, records: list[dict]) -> None:
        self.last = records
        if self.history.maxlen != 0:
            self.history.append(records)


class JsonlSink(RecordSink):
    """Append each record as one JSON line (``pandas.read_json(path, lines=True)`` reads it).

    The file is opened at construction (an unopenable path raises there) and each recorded
    forward's records are written at once, one ``json.dumps(record)`` line each, straight to the
    file (no buffer is left to flush at :meth:`close`).  A write that fails (a full disk) is cut
    back to the file's previous end before the error is raised, so the file never holds half a
    line or half a forward; :class:`SinkSet` turns the error into a warning and later forwards
    are written again once there is room.

    Parameters
    ----------
    path : str or os.PathLike
        The file; with ``per_rank=True`` it must contain ``{rank}``, replaced by this process's
        ``torch.distributed`` rank (0 without a process group; build the sink after
        ``init_process_group``).
    per_rank : bool
        Every rank writes its own file (default False: only the writer rank writes ``path``).

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "ent.jsonl")
    >>> sink = JsonlSink(path)
    >>> sink.write([{"step": 0, "head": 0}]); sink.close()
    >>> open(path).read()
    '{"step": 0, "head": 0}\\n'
    """

    def __init__(self, path, *, per_rank: bool = False):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not isinstance(per_rank, bool):
            raise TypeError(f"per_rank must be a bool, got {type(per_rank).__name__}")
        if per_rank:
            text = os.fsdecode(path)
            if "{rank}" not in text:
                raise ValueError(f"path must contain '{{rank}}' with per_rank=True, got {text!r}")
            path = text.replace("{rank}", str(_rank()))
        self.all_ranks = per_rank
        self.path = path
        # opened here, on every rank: a path that cannot be opened raises before anything runs;
        # unbuffered, so that a write either lands whole or is cut back (see write)
        self._file = open(path, "ab", buffering=0)

    def write(self, records: list[dict]) -> None:
        data = "".join(json.dumps(rec) + "\n" for rec in records).encode("utf-8")
        end = os.fstat(self._file.fileno()).st_size
        try:
            view = memoryview(data)
            while view:  # os.write may write part of it
                view = view[self._file.write(view):]
        except BaseException:
            try:  # never leave half a line: back to the end before this forward
                os.ftruncate(self._file.fileno(), end)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SinkSet:
    """The sinks of one monitor: delivers each write to all of them under the one-writer rule.

    ``write(records)`` gives the records to every sink whose ``all_ranks`` is True, and to the
    others only where :func:`is_writer` holds.  A sink's exception becomes a ``RuntimeWarning``
    (once per sink and exception type) and the remaining sinks still receive the records;
    ``close()`` closes every sink once, in the same way.

    Parameters
    ----------
    sinks : iterable
        Objects with callable ``write`` and ``close`` (TypeError otherwise, naming the argument).
    """

    def __init__(self, sinks, *, argument: str = "sinks"):
        sinks = list(sinks)
        for s in sinks:
            if not (callable(getattr(s, "write", None)) and callable(getattr(s, "close", None))):
                raise TypeError(f"{argument} must hold objects with write(records) and close() methods "
                                f"(sigma_core.sinks.RecordSink), got {type(s).__name__}")
        self.sinks = sinks
        self._warned: set = set()

    def _warn(self, i: int, sink, what: str, err: Exception) -> None:
        key = (i, what, type(err).__name__)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"EntropyMonitor: sink {type(sink).__name__} failed to {what}: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)

    def write(self, records: list[dict]) -> None:
        writer = None  # asked once per write, only if a sink needs it
        for i, sink in enumerate(self.sinks):
            if not getattr(sink, "all_ranks", False):
                if writer is None:
                    writer = is_writer()
                if not writer:
                    continue
            try:
                sink.write(records)
            except Exception as err:  # never fail the user's forward
                self._warn(i, sink, "write", err)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for i, sink in enumerate(sinks):
            try:
                sink.close()
            except Exception as err:
                self._warn(i, sink, "close", err)


def record_scalars(records: list[dict], *, prefix: str = "") -> dict[str, float]:
    """The scalars a logger shows for one recorded forward, by name.

    The names are the same for every integration (TensorBoard tags, ``Trainer.log`` and
    ``LightningModule.log`` keys; ``/`` groups them in TensorBoard), ``L`` the layer index and
    ``h`` the head:

    - ``entropy/layerL/headh``: the head's mean row entropy (``entropy_mean``, nats);
    - ``entropy_min_head/layerL``: the smallest of these over the layer's heads, and
      ``entropy_min_head/all`` over every layer;
    - ``sigma/layerL/headh``: ``sigma_h`` (on forwards that check the bound, where the weights are known);
    - ``bound_margin_<variant>/layerL``: the smallest over the layer's heads of ``entropy_min -
      bound_<variant>``, how far the lowest row entropy sits above the variant's lower bound
      (on checked forwards where the variant applies; never below 0 when every row is checked,
      ``bound_samples=None``, since each row's entropy is at least its own bound);
    - ``violations_<variant>``: rows below the variant's bound, summed over layers and heads
      (on checked forwards; must be 0);
    - ``rows_nonfinite``: rows left out of the bound check because their logit norm is not
      finite (a diverging model), summed over layers and heads; only when there are some.

    Parameters
    ----------
    records : list of dict
        The records of one recorded forward (``EntropyMonitor.last``).
    prefix : str
        Put before every name (``"eval_"`` for an evaluation forward, say).

    Examples
    --------
    >>> recs = [{"layer": 0, "head": h, "entropy_mean": e, "entropy_min": e - 0.5, "sigma": None,
    ...          **{f"bound_{v}": None for v in _VARIANTS}, **{f"violations_{v}": None for v in _VARIANTS}}
    ...         for h, e in enumerate([2.0, 1.5])]
    >>> recs[1].update(bound_exact=0.25, violations_exact=0)
    >>> record_scalars(recs)
    {'entropy/layer0/head0': 2.0, 'entropy/layer0/head1': 1.5, 'entropy_min_head/layer0': 1.5, 'entropy_min_head/all': 1.5, 'bound_margin_exact/layer0': 0.75, 'violations_exact': 0}
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    heads: dict[str, float] = {}
    sigma: dict[str, float] = {}
    low: dict[int, float] = {}
    margin: dict[str, float] = {}
    violations: dict[str, int] = {}
    nonfinite = 0
    for r in records:
        nonfinite += int(r.get("rows_nonfinite") or 0)
        layer, head, ent = r["layer"], r["head"], r["entropy_mean"]
        heads[f"{prefix}entropy/layer{layer}/head{head}"] = ent
        low[layer] = min(low.get(layer, math.inf), ent)
        if r.get("sigma") is not None:
            sigma[f"{prefix}sigma/layer{layer}/head{head}"] = r["sigma"]
        for v in _VARIANTS:
            bound = r.get(f"bound_{v}")
            if bound is not None:
                key = f"{prefix}bound_margin_{v}/layer{layer}"
                margin[key] = min(margin.get(key, math.inf), r["entropy_min"] - bound)
            count = r.get(f"violations_{v}")
            if count is not None:
                key = f"{prefix}violations_{v}"
                violations[key] = violations.get(key, 0) + int(count)
    out = dict(heads)
    out.update({f"{prefix}entropy_min_head/layer{layer}": v for layer, v in low.items()})
    if low:
        out[f"{prefix}entropy_min_head/all"] = min(low.values())
    out.update(sigma)
    out.update(margin)
    out.update(violations)
    if nonfinite:
        out[f"{prefix}rows_nonfinite"] = nonfinite
    return out


def entropy_grid(records: list[dict], field: str = "entropy_mean") -> np.ndarray:
    """``field`` of one recorded forward as a layer x head array (NaN where a layer has fewer heads).

    Examples
    --------
    >>> entropy_grid([{"layer": 0, "head": 0, "entropy_mean": 1.0}, {"layer": 1, "head": 1, "entropy_mean": 2.0}])
    array([[ 1., nan],
           [nan,  2.]])
    """
    if not records:
        raise ValueError("records must hold at least one record")
    grid = np.full((max(r["layer"] for r in records) + 1, max(r["head"] for r in records) + 1), np.nan)
    for r in records:
        if r.get(field) is not None:
            grid[r["layer"], r["head"]] = r[field]
    return grid
