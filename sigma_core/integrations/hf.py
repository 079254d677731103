"""Per-head attention entropy in a Hugging Face ``Trainer`` run, logged through ``Trainer.log``.

:class:`HFEntropyCallback` is a ``transformers.TrainerCallback``: when training begins it
attaches an :class:`~sigma_core.monitor.EntropyMonitor` to the model being trained, records
optimiser steps ``1, every, 2*every, ...`` (the first forward of each: one record per optimiser
step under gradient accumulation) and logs the scalars of :func:`sigma_core.sinks.record_scalars`
with ``Trainer.log`` at that step, so every logger the run reports to (``report_to``:
TensorBoard, Weights & Biases, MLflow, ...) and ``trainer.state.log_history`` receive them.
Evaluation forwards are not recorded unless ``record_eval=True`` (then the first forward of each
evaluation, logged under ``eval_`` names when the evaluation ends).  The schedule depends on the
trainer's count of optimiser steps only, so a run resumed from a checkpoint records the steps an
uninterrupted run would.

Requires ``transformers`` (``pip install "entropy-collapse[hf]"``).
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - the hf extra is installed with the tests
    raise ImportError("sigma_core.integrations.hf needs transformers: pip install 'entropy-collapse[hf]'") from err

from sigma_core.integrations._schedule import StepSchedule
from sigma_core.sinks import record_scalars

__all__ = ["HFEntropyCallback"]


class HFEntropyCallback(TrainerCallback):
    """Log per-head attention entropy, ``sigma_h``, bound margins and violations with ``Trainer.log``.

    Parameters
    ----------
    every : int
        Record optimiser steps whose number is a multiple of ``every`` (and step 1, see
        ``first_step``); the logged values carry that step, as ``Trainer.log`` gives them.
    first_step : bool
        Record optimiser step 1 too (default True).
    record_eval : bool
        Record the first forward of each evaluation, logged with names prefixed ``eval_prefix``
        (default False: evaluation forwards are not recorded).
    eval_prefix : str
        Put before the names of evaluation scalars (default ``"eval_"``, the ``Trainer``'s own).
    **monitor_options
        Passed to :class:`~sigma_core.monitor.EntropyMonitor` (``bound_samples``, ``path``,
        ``sinks``, ``detector``, ...).  ``bound_every`` (default 10) is counted by step number: the
        bound and ``sigma_h`` are checked on the first recorded step and on steps that are multiples
        of ``every * bound_every``, the same steps in a resumed run.

    Attributes
    ----------
    monitor : EntropyMonitor or None
        The monitor on the model while it trains (None before and after).

    Notes
    -----
    A callback does not see the ``Trainer`` it belongs to, and ``Trainer.log`` is the trainer's:
    add it with :meth:`add_to` (``trainer.add_callback`` and the reference in one call), or pass
    ``trainer=`` and ``callbacks=[...]`` yourself.

    Examples
    --------
    >>> import contextlib, io, tempfile, torch, transformers
    >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    ...     n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=32))
    >>> data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (8, 16))]
    >>> args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=2,
    ...     report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True)
    >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    >>> callback = HFEntropyCallback(every=2).add_to(trainer)
    >>> with contextlib.redirect_stdout(io.StringIO()):
    ...     _ = trainer.train()
    >>> [(log["step"], sorted(k for k in log if k.startswith("entropy/"))) for log in trainer.state.log_history
    ...  if "entropy_min_head/all" in log]
    [(1, ['entropy/layer0/head0', 'entropy/layer0/head1']), (2, ['entropy/layer0/head0', 'entropy/layer0/head1']), \
(4, ['entropy/layer0/head0', 'entropy/layer0/head1'])]
    """

    def __init__(self, every: int = 10, *, first_step: bool = True, record_eval: bool = False,
                 eval_prefix: str = "eval_", trainer=None, **monitor_options):
        if not isinstance(record_eval, bool):
            raise TypeError(f"record_eval must be a bool, got {type(record_eval).__name__}")
        if not isinstance(eval_prefix, str):
            raise TypeError(f"eval_prefix must be a str, got {type(eval_prefix).__name__}")
        if trainer is not None and not callable(getattr(trainer, "log", None)):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.schedule = StepSchedule(every, first_step=first_step, monitor_options=monitor_options)
        self.record_eval = record_eval
        self.eval_prefix = eval_prefix
        self.trainer = trainer
        self._in_step = False
        self._eval_armed = False
        self._hook = None

    @property
    def every(self) -> int:
        return self.schedule.every

    @property
    def monitor(self):
        return self.schedule.monitor

    def add_to(self, trainer) -> "HFEntropyCallback":
        """``trainer.add_callback(self)``, and log through ``trainer.log``; returns ``self``."""
        if not (callable(getattr(trainer, "log", None)) and callable(getattr(trainer, "add_callback", None))):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def close(self) -> None:
        """Remove the monitor from the model (done when training ends; idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.schedule.close()

    # -- the Trainer's events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError("HFEntropyCallback logs through Trainer.log: add it with "
                               "HFEntropyCallback(...).add_to(trainer), or pass trainer=")
        if model is None:
            model = self.trainer.model
        self.close()
        self.schedule.attach(model)
        # before the monitor's own pre-hook: an evaluation forward (outside a training step) is asked for here
        self._hook = model.register_forward_pre_hook(self._before_forward, prepend=True)
        self._in_step = False
        self._eval_armed = False

    def _before_forward(self, module, args):
        if self.record_eval and not self._in_step and not self._eval_armed and self.schedule.monitor is not None:
            self._eval_armed = True
            self.schedule.arm("eval")

    def on_step_begin(self, args, state, control, **kwargs):
        self._in_step = True
        self.schedule.step_begins(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._in_step = False
        if self.schedule.stepped(state.global_step):
            records = self.schedule.take("train")
            if records:
                self.trainer.log(record_scalars(records))

    def on_evaluate(self, args, state, control, **kwargs):
        self._eval_armed = False
        records = self.schedule.take("eval")
        if records:
            self.trainer.log(record_scalars(records, prefix=self.eval_prefix))

    def on_predict(self, args, state, control, **kwargs):
        self._eval_armed = False
        self.schedule.take("eval")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
