"""A record sink for TensorBoard: scalars and layer x head entropy heatmaps.

:class:`TensorBoardSink` writes, for each recorded forward, the scalars of
:func:`sigma_core.sinks.record_scalars` (``add_scalar``) and, on the first record and every
``heatmap_every``-th after it, an image of every head's mean entropy, layers down and heads
across (``add_image``, tag ``entropy/heatmap``), through ``torch.utils.tensorboard.SummaryWriter``.
Under ``torch.distributed`` only rank 0 writes (the sinks' one-writer rule).

Requires the ``tensorboard`` package (``pip install "entropy-collapse[tensorboard]"``).
"""
from __future__ import annotations

import math
import os

import numpy as np

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as err:  # pragma: no cover - the tensorboard extra is installed with the tests
    raise ImportError("sigma_core.integrations.tensorboard needs tensorboard: "
                      "pip install 'entropy-collapse[tensorboard]'") from err

from sigma_core.sinks import RecordSink, entropy_grid, record_scalars

__all__ = ["TensorBoardSink", "heatmap_image"]

HEATMAP_TAG = "entropy/heatmap"


def heatmap_image(records: list[dict]) -> np.ndarray:
    """The layer x head heatmap of ``entropy_mean`` of one recorded forward, as an RGB image.

    Colour runs from 0 nats to the largest ``log_seq_len`` of the records (uniform attention);
    each cell is annotated with its value.  Returns a ``(height, width, 3)`` ``uint8`` array.

    Examples
    --------
    >>> recs = [{"layer": l, "head": h, "entropy_mean": 1.0 + l, "log_seq_len": math.log(16)}
    ...         for l in range(2) for h in range(4)]
    >>> img = heatmap_image(recs)
    >>> img.dtype, img.ndim, img.shape[2]
    (dtype('uint8'), 3, 3)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = entropy_grid(records)
    top = max((r.get("log_seq_len") or 0.0) for r in records) or float(np.nanmax(grid)) or 1.0
    n_layer, n_head = grid.shape
    fig = Figure(figsize=(1.2 + 0.55 * n_head, 0.8 + 0.4 * n_layer), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0.0, vmax=top, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="entropy (nats)")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    if n_layer * n_head <= 256:
        for (layer, head), value in np.ndenumerate(grid):
            if not math.isnan(value):
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * top else "black")
    step = records[0].get("step")
    ax.set_title(f"attention entropy, step {step}" if step is not None else "attention entropy", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class TensorBoardSink(RecordSink):
    """Write each recorded forward's scalars, and every ``heatmap_every``-th a heatmap, to TensorBoard.

    Parameters
    ----------
    log_dir : str or os.PathLike or SummaryWriter
        The folder of the event files (a ``SummaryWriter`` is made for it, and closed with the
        sink), or a writer of the caller's (flushed, not closed, by :meth:`close`).
    heatmap_every : int or None
        Write the layer x head heatmap (:func:`heatmap_image`) on the first record and every
        ``heatmap_every``-th after it (default 10; None: never).
    step : callable or None
        Returns the global step to write under (the training step of the caller's loop, say);
        None (default): each record's ``step``, the index of the model forward.
    prefix : str
        Put before every tag.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from sigma_core.monitor import EntropyMonitor
    >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    >>> log_dir = tempfile.mkdtemp()
    >>> with EntropyMonitor(layer, every=1, sinks=[TensorBoardSink(log_dir, heatmap_every=2)]) as mon:
    ...     for _ in range(3):
    ...         _ = layer(torch.randn(2, 5, 8))
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> events = EventAccumulator(log_dir).Reload()
    >>> [e.step for e in events.Images("entropy/heatmap")], len(events.Scalars("entropy/layer0/head1"))
    ([0, 2], 3)
    """

    def __init__(self, log_dir, *, heatmap_every: int | None = 10, step=None, prefix: str = ""):
        if isinstance(log_dir, SummaryWriter):
            self.writer, self._owned = log_dir, False
        elif isinstance(log_dir, (str, bytes, os.PathLike)):
            self.writer, self._owned = None, True
        else:
            raise TypeError(f"log_dir must be a str, os.PathLike or SummaryWriter, got {type(log_dir).__name__}")
        if heatmap_every is not None and (not isinstance(heatmap_every, int) or isinstance(heatmap_every, bool)
                                          or heatmap_every < 1):
            raise ValueError(f"heatmap_every must be a positive int or None, got {heatmap_every!r}")
        if step is not None and not callable(step):
            raise TypeError(f"step must be callable or None, got {type(step).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.heatmap_every = heatmap_every
        self.step = step
        self.prefix = prefix
        self.written = 0  # recorded forwards written
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=os.fsdecode(log_dir))

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        step = int(self.step()) if self.step is not None else int(records[0]["step"])
        for tag, value in record_scalars(records, prefix=self.prefix).items():
            self.writer.add_scalar(tag, value, step)
        if self.heatmap_every is not None and self.written % self.heatmap_every == 0:
            self.writer.add_image(self.prefix + HEATMAP_TAG, heatmap_image(records), step, dataformats="HWC")
        self.written += 1
        self.writer.flush()

    def close(self) -> None:
        if self.writer is None:
            return
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()
        self.writer = None
