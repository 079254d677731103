"""The monitor where people already watch their training.

- :class:`~sigma_core.integrations.hf.HFEntropyCallback`: a ``transformers.TrainerCallback``
  logging through ``Trainer.log``;
- :class:`~sigma_core.integrations.lightning.LightningEntropyCallback`: a Lightning ``Callback``
  handing the scalars to the trainer's loggers (``log_metrics``);
- :class:`~sigma_core.integrations.tensorboard.TensorBoardSink`: a record sink writing scalars
  and layer x head entropy heatmaps through ``torch.utils.tensorboard.SummaryWriter``.

Each lives in its own module and imports its framework only when it is used, so the rest of
``sigma_core`` needs none of them (``pip install "entropy-collapse[hf]"``, ``[lightning]``,
``[tensorboard]``).  Every one logs the scalars of :func:`sigma_core.sinks.record_scalars`.
"""
from __future__ import annotations

import importlib

__all__ = ["HFEntropyCallback", "LightningEntropyCallback", "TensorBoardSink"]

_WHERE = {"HFEntropyCallback": "hf", "LightningEntropyCallback": "lightning", "TensorBoardSink": "tensorboard"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
