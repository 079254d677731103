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
uninterrupted run would.  Under ``torch.distributed`` every rank records its own forward and calls
``Trainer.log`` at the same steps, as the ``Trainer`` does with its own loss (so every rank takes
the same path through the training loop), and the ``report_to`` loggers write on the world process
zero only (their rule), so what they show is rank 0's.

Requires ``transformers`` (``pip install "entropy-collapse[hf]"``).
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - the hf extra is installed with the tests
    raise ImportError("sigma_core.integrations.hf needs transformers: pip install 'entropy-collapse[hf]'") from err

from sigma_core.integrations._schedule import EntropyCallback
from sigma_core.sinks import record_scalars

__all__ = ["HFEntropyCallback"]


class HFEntropyCallback(EntropyCallback, TrainerCallback):
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
        ``sinks``, ``detector``, ...).  ``bound_every`` (default 10) counts recorded steps, as the monitor
        does: the bound and ``sigma_h`` are checked on the first recorded step and on every
        ``bound_every``-th recorded step after it, counted from the step number (the same steps in
        a resumed run).

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
        if trainer is not None and not callable(getattr(trainer, "log", None)):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self._setup(every, first_step=first_step, record_eval=record_eval, eval_prefix=eval_prefix,
                    monitor_options=monitor_options)
        self.trainer = trainer
        self._in_step = False
        self._eval_armed = False
        self._hook = None

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
        super().close()

    def _log(self, control, scalars: dict) -> None:
        """``Trainer.log(scalars)``, leaving ``control.should_log`` as it was: ``Trainer.log`` clears
        it, and inside ``on_step_end`` that would drop the ``Trainer``'s own log of this step (its
        loss, gathered from every rank: under ``torch.distributed`` a rank that skipped it would
        leave the others waiting in that collective)."""
        should_log = control.should_log
        self.trainer.log(scalars)
        control.should_log = self.trainer.control.should_log = should_log

    # -- the Trainer's events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError("HFEntropyCallback logs through Trainer.log: add it with "
                               "HFEntropyCallback(...).add_to(trainer), or pass trainer=")
        if model is None:
            model = self.trainer.model
        self.close()
        self.schedule.attach(model)
        if self.record_eval:  # (otherwise no forward of the model pays for a hook of ours)
            # before the monitor's own pre-hook: an evaluation forward (outside a training step) is asked for here
            self._hook = model.register_forward_pre_hook(self._before_forward, prepend=True)
        self._in_step = False
        self._eval_armed = False

    def _before_forward(self, module, args):
        if not self._in_step and not self._eval_armed and self.schedule.monitor is not None:
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
                self._log(control, record_scalars(records))

    def on_evaluate(self, args, state, control, **kwargs):
        self._eval_armed = False
        records = self.schedule.take("eval")
        if records:
            self._log(control, record_scalars(records, prefix=self.eval_prefix))

    def on_predict(self, args, state, control, **kwargs):
        self._eval_armed = False
        self.schedule.take("eval")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
