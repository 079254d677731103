"""What both training callbacks share: which optimiser steps record, and the records they took.

A :class:`StepSchedule` owns an :class:`~sigma_core.monitor.EntropyMonitor` with ``every=None``
on the model being trained and asks it to record (:meth:`EntropyMonitor.record_next
<sigma_core.monitor.EntropyMonitor.record_next>`) only the first forward of an optimiser step
that is due, so gradient accumulation gives one record per optimiser step, and an evaluation
forward only when the callback asks for it.  Which steps are due depends on the trainer's count
of completed optimiser steps alone, so a resumed run keeps the schedule of an uninterrupted one.
:class:`EntropyCallback` is what the two callbacks share: their common arguments, checked up
front, the ``every`` and ``monitor`` properties, and the rule of which process logs.
"""
from __future__ import annotations

import numbers

from torch import nn

from sigma_core.monitor import EntropyMonitor
from sigma_core.sinks import RecordSink


def check_every(every) -> int:
    if not isinstance(every, numbers.Integral) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    return int(every)


class _Taken(RecordSink):
    """The records of each recorded forward, by the phase that asked for it (on every rank: which
    process logs them is the callbacks' rule, :class:`EntropyCallback`)."""

    all_ranks = True

    def __init__(self, schedule: "StepSchedule"):
        self.schedule = schedule

    def write(self, records):
        self.schedule.taken[self.schedule.phase] = records


class StepSchedule:
    """Record optimiser steps ``1, every, 2*every, ...`` (counted from 1; step 1 only with
    ``first_step``) of a model, once per step.

    Parameters
    ----------
    every : int
        Record the optimiser steps whose number (completed steps after it) is a multiple of ``every``.
    first_step : bool
        Record optimiser step 1 too (default True), so the start of a run is seen.
    monitor_options : dict
        Keyword arguments of :class:`~sigma_core.monitor.EntropyMonitor` (``bound_samples``,
        ``path``, ``sinks``, ``detector``, ...), not ``every``.  ``bound_every`` (default 10)
        counts recorded steps here too, as the monitor does: the bound is checked on the first
        recorded step and on every ``bound_every``-th recorded step after it, counted from the
        step number (so a resumed run checks it on the same steps as an uninterrupted one).

    Examples
    --------
    >>> s = StepSchedule(every=10)
    >>> [n for n in range(1, 201) if s.due(n - 1)][:5]   # the trainer has completed n - 1 steps
    [1, 10, 20, 30, 40]
    >>> [n for n in range(1, 201) if s.due(n - 1) and s.checks_bound(n - 1)]
    [1, 100, 200]
    >>> s = StepSchedule(every=1)                        # as EntropyMonitor(every=1): forwards 0, 10, 20
    >>> [n for n in range(1, 32) if s.due(n - 1) and s.checks_bound(n - 1)]
    [1, 11, 21, 31]
    """

    def __init__(self, every: int, *, first_step: bool = True, monitor_options: dict | None = None):
        self.every = check_every(every)
        if not isinstance(first_step, bool):
            raise TypeError(f"first_step must be a bool, got {type(first_step).__name__}")
        self.first_step = first_step
        options = dict(monitor_options or {})
        if "every" in options:
            raise TypeError("every is the callback's own argument (optimiser steps), not a monitor option")
        bound_every = options.get("bound_every", 10)
        if not isinstance(bound_every, numbers.Integral) or isinstance(bound_every, bool) or bound_every < 1:
            raise ValueError(f"bound_every must be a positive int, got {bound_every!r}")
        self.bound_every = int(bound_every)
        self.monitor_options = options
        self.monitor: EntropyMonitor | None = None
        self.phase = "train"
        self.taken: dict[str, list[dict]] = {}
        self._armed: int | None = None  # completed-step count of the step asked to record

    def due(self, completed: int) -> bool:
        """Whether the optimiser step after ``completed`` completed steps records."""
        n = completed + 1
        return n % self.every == 0 or (self.first_step and n == 1)

    def recorded_before(self, completed: int) -> int:
        """How many steps before the one after ``completed`` completed steps are due (record)."""
        n = completed + 1
        early = self.first_step and self.every > 1 and n > 1  # step 1, due but not a multiple of every
        return (n - 1) // self.every + int(early)

    def checks_bound(self, completed: int) -> bool:
        """Whether a due step after ``completed`` completed steps checks the bound (and ``sigma_h``):
        the first recorded step and every ``bound_every``-th recorded step after it."""
        return self.recorded_before(completed) % self.bound_every == 0

    def attach(self, model: nn.Module) -> EntropyMonitor:
        """Watch ``model`` (a monitor attached earlier is closed first)."""
        self.close()
        options = dict(self.monitor_options)
        extra = options.get("sinks")
        if extra is None or callable(getattr(extra, "write", None)) or not hasattr(extra, "__iter__"):
            extra = [] if extra is None else extra  # (the monitor refuses a bare sink by name)
        else:
            extra = list(extra)
        options["sinks"] = [_Taken(self)] + extra if isinstance(extra, list) else extra
        self.monitor = EntropyMonitor(model, every=None, **options)
        self.taken = {}
        self._armed = None
        return self.monitor

    def step_begins(self, completed: int) -> None:
        """Called before each micro-batch (or once per optimiser step) with the trainer's count of
        completed optimiser steps: the first forward of a due step records."""
        if self.monitor is not None and self._armed != completed and self.due(completed):
            self._armed = completed
            self.arm("train", check_bound=self.checks_bound(completed))

    def stepped(self, completed: int) -> bool:
        """Whether the step asked to record has completed (``completed`` steps now)."""
        return self._armed is not None and completed > self._armed

    def arm(self, phase: str, check_bound: bool = True) -> None:
        """The next forward records (checking the bound or not), its records kept as ``phase``."""
        self.phase = phase
        self.taken.pop(phase, None)
        self.monitor.record_next(check_bound=check_bound)

    def take(self, phase: str) -> list[dict] | None:
        """The records of the latest recorded forward of ``phase`` (None if none since the last take)."""
        return self.taken.pop(phase, None)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


class EntropyCallback:
    """The part of :class:`~sigma_core.integrations.hf.HFEntropyCallback` and
    :class:`~sigma_core.integrations.lightning.LightningEntropyCallback` that does not depend on the
    framework: the arguments both take (checked here, by name), the schedule, ``every`` and
    ``monitor``, and closing.

    Which process logs: under ``torch.distributed`` every rank records its own forward (its own
    share of the batch; the monitor's sinks follow the monitor's rule) and hands the scalars to the
    framework's logging at the same steps, exactly as the framework does with its own metrics, so
    every rank takes the same path through the training loop and none waits for another in a
    collective the others skipped.  The framework's loggers write on rank 0 only (the ``Trainer``'s
    ``report_to`` loggers on ``is_world_process_zero``, Lightning's loggers ``rank_zero_only``):
    what they show is rank 0's values.
    """

    def _setup(self, every, *, first_step: bool, record_eval: bool, eval_prefix: str,
               monitor_options: dict) -> None:
        if not isinstance(record_eval, bool):
            raise TypeError(f"record_eval must be a bool, got {type(record_eval).__name__}")
        if not isinstance(eval_prefix, str):
            raise TypeError(f"eval_prefix must be a str, got {type(eval_prefix).__name__}")
        self.schedule = StepSchedule(every, first_step=first_step, monitor_options=monitor_options)
        self.record_eval = record_eval
        self.eval_prefix = eval_prefix

    @property
    def every(self) -> int:
        """Record optimiser steps whose number is a multiple of this (and step 1 with ``first_step``)."""
        return self.schedule.every

    @property
    def monitor(self) -> EntropyMonitor | None:
        """The monitor on the model while it trains (None before and after)."""
        return self.schedule.monitor

    def close(self) -> None:
        """Remove the monitor from the model (done when training ends; idempotent)."""
        self.schedule.close()
