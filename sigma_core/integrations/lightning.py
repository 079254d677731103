"""Per-head attention entropy in a Lightning run, written to the trainer's loggers.

:class:`LightningEntropyCallback` is a ``lightning.pytorch.Callback``: when fitting starts it
attaches an :class:`~sigma_core.monitor.EntropyMonitor` to the module being trained (the
``LightningModule``, or the submodule named by ``module`` when ``training_step`` calls that one
directly), records optimiser steps ``1, every, 2*every, ...`` (``trainer.global_step`` after
the step; the first forward of each, so one record per optimiser step under
``accumulate_grad_batches``) and hands the scalars of :func:`sigma_core.sinks.record_scalars` to
every logger of the trainer (``trainer.loggers``: TensorBoard, CSV, Weights & Biases, ...) with
``log_metrics``, at the step Lightning gives that optimiser step's own training metrics, exactly
as Lightning's logger connector does.  (Not through ``LightningModule.log``: Lightning re-sends a
value logged there on every later logging step of the epoch, so a record of every 10th step would
reach the loggers on each step, stale.)  Validation forwards are not recorded unless
``record_eval=True`` (then the first validation batch of each validation run, sanity check
excluded, under ``val_`` names).  Under ``torch.distributed`` (``strategy="ddp"``) every rank
records its own forward and hands it to the loggers, which write on the global-zero process only.  A run resumed with
``fit(..., ckpt_path=...)`` records the steps an uninterrupted run would.

Requires ``lightning`` (``pip install "entropy-collapse[lightning]"``).
"""
from __future__ import annotations

import warnings

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - the lightning extra is installed with the tests
    raise ImportError("sigma_core.integrations.lightning needs lightning: "
                      "pip install 'entropy-collapse[lightning]'") from err

from sigma_core.integrations._schedule import EntropyCallback
from sigma_core.sinks import record_scalars

__all__ = ["LightningEntropyCallback"]


class LightningEntropyCallback(EntropyCallback, Callback):
    """Log per-head attention entropy, ``sigma_h``, bound margins and violations to the trainer's loggers.

    Parameters
    ----------
    every : int
        Record optimiser steps whose number (``trainer.global_step`` after the step) is a
        multiple of ``every``, and step 1 with ``first_step``.
    module : str or None
        Dotted name of the submodule to watch (``"model"`` for ``self.model``), for a
        ``training_step`` that calls it rather than ``self(...)``; None (default): the
        ``LightningModule`` itself.
    first_step : bool
        Record optimiser step 1 too (default True).
    record_eval : bool
        Record the first batch of each validation run (default False).
    eval_prefix : str
        Put before the names of validation scalars (default ``"val_"``).
    **monitor_options
        Passed to :class:`~sigma_core.monitor.EntropyMonitor` (``bound_samples``, ``path``,
        ``sinks``, ``detector``, ...).  ``bound_every`` (default 10) counts recorded steps, as the monitor
        does: the bound and ``sigma_h`` are checked on the first recorded step and on every
        ``bound_every``-th recorded step after it, counted from the step number (the same steps in
        a resumed run).

    Examples
    --------
    >>> import tempfile, torch, lightning
    >>> from torch import nn
    >>> class Tiny(lightning.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    ...     def forward(self, x):
    ...         return self.layer(x)
    ...     def training_step(self, x, i):
    ...         return self(x).square().mean()
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> class Keep(lightning.pytorch.loggers.Logger):
    ...     name, version, logged = "keep", 0, []
    ...     def log_metrics(self, metrics, step):
    ...         self.logged.append((step, metrics))
    ...     def log_hyperparams(self, params):
    ...         pass
    >>> trainer = lightning.Trainer(max_steps=4, logger=Keep(), callbacks=[
    ...     LightningEntropyCallback(every=2)], enable_progress_bar=False, enable_model_summary=False,
    ...     enable_checkpointing=False, default_root_dir=tempfile.mkdtemp(), accelerator="cpu")
    >>> trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(8, 5, 8), batch_size=2))
    >>> [(step, sorted(k for k in m if k.startswith("entropy/"))) for step, m in Keep.logged]
    [(0, ['entropy/layer0/head0', 'entropy/layer0/head1']), (1, ['entropy/layer0/head0', 'entropy/layer0/head1']), \
(3, ['entropy/layer0/head0', 'entropy/layer0/head1'])]
    """

    def __init__(self, every: int = 10, *, module: str | None = None, first_step: bool = True,
                 record_eval: bool = False, eval_prefix: str = "val_", **monitor_options):
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be a str (a dotted submodule name) or None, got {type(module).__name__}")
        self._setup(every, first_step=first_step, record_eval=record_eval, eval_prefix=eval_prefix,
                    monitor_options=monitor_options)
        self.module = module
        self._warned = False

    def _watched(self, pl_module):
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as err:
            raise ValueError(f"module={self.module!r}: the LightningModule has no such submodule ({err})") from None

    # -- Lightning's hooks -------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        self.schedule.attach(self._watched(pl_module))

    @staticmethod
    def _log(trainer, records: list[dict], prefix: str = "") -> None:
        """The scalars of ``records`` to every logger, at the step of Lightning's own metrics of this
        optimiser step, on every rank, as Lightning's logger connector does (its loggers write on
        the global-zero process only)."""
        metrics = record_scalars(records, prefix=prefix)
        loop = trainer.fit_loop.epoch_loop
        step = getattr(loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.schedule.step_begins(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.schedule.stepped(trainer.global_step):
            return
        self.schedule._armed = None  # logged once, at the end of the step's last micro-batch
        records = self.schedule.take("train")
        if records:
            self._log(trainer, records)
        elif not self._warned:
            self._warned = True
            warnings.warn("LightningEntropyCallback: a recorded step ran no forward of the watched module "
                          f"({type(self._watched(pl_module)).__name__}) that calls attention; if training_step "
                          "calls a submodule directly, pass module='name'", RuntimeWarning, stacklevel=2)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.record_eval and batch_idx == 0 and not trainer.sanity_checking and self.monitor is not None:
            self.schedule.arm("eval")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        records = self.schedule.take("eval")
        if records:
            self._log(trainer, records, self.eval_prefix)

    def on_fit_end(self, trainer, pl_module):
        self.close()

    def on_exception(self, trainer, pl_module, exception):
        self.close()
