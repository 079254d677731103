"""Byte-level training data with no download: the CPython standard library's source.

The corpus (shared/CALIBRATION.md) is the concatenation of every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (installed third-party packages under ``site-packages`` /
``dist-packages`` excluded, so the bytes depend on the Python version only), sorted by their
path relative to that directory, cut to the first ``max_bytes`` bytes.  Its SHA-256 and size go
into every run's config, so two runs can be compared only when they trained on the same bytes.
The last ``val_fraction`` of it is held out for the validation loss.

Batches are random windows drawn with a caller-owned :class:`torch.Generator`, so the data order
is a pure function of the generator's state (and can be saved and restored with it).

Example
-------
>>> corpus = load_stdlib_corpus(max_bytes=4096)
>>> corpus.size, len(corpus.sha256), corpus.train.numel() + corpus.val.numel() == corpus.size
(4096, 64, True)
>>> g = torch.Generator().manual_seed(0)
>>> x, y = get_batch(corpus.train, batch_size=2, block_size=8, generator=g)
>>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())  # targets are inputs shifted by one
((2, 8), True)
"""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

_THIRD_PARTY = ("site-packages", "dist-packages")


@dataclass(frozen=True)
class Corpus:
    """Byte tokens split into ``train`` and held-out ``val`` (uint8 tensors) and their provenance."""

    train: torch.Tensor
    val: torch.Tensor
    sha256: str
    size: int
    n_files: int
    root: str

    def describe(self) -> dict:
        """JSON-ready provenance: source, size in bytes, SHA-256, number of files, split sizes."""
        return {"source": "cpython-stdlib", "root": self.root, "size": self.size,
                "sha256": self.sha256, "n_files": self.n_files,
                "train_bytes": int(self.train.numel()), "val_bytes": int(self.val.numel())}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``*.py`` files of the standard library at ``root``, sorted by relative path."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"root is not a directory: {root}")
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not any(part in _THIRD_PARTY for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=4)
def _read_corpus(max_bytes: int, root: str | None) -> tuple[bytes, int, str]:
    chunks, total, n_files = [], 0, 0
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(base):
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        n_files += 1
        if total >= max_bytes:
            break
    return b"".join(chunks), n_files, str(base)


def load_stdlib_corpus(max_bytes: int = 8 * 2**20, val_fraction: float = 0.1,
                       root: str | None = None) -> Corpus:
    """Load the first ``max_bytes`` bytes of the stdlib corpus, holding out the last ``val_fraction``.

    Raises ``ValueError`` when the standard library holds fewer than ``max_bytes`` bytes of
    source, so a run never silently trains on a different amount of data than it records.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 2:
        raise ValueError(f"max_bytes must be an integer >= 2, got {max_bytes!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    raw, n_files, base = _read_corpus(max_bytes, root)
    if len(raw) < max_bytes:
        raise ValueError(f"max_bytes={max_bytes} exceeds the {len(raw)} bytes of source under {base}")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # (N,)
    n_val = max(1, int(round(len(raw) * val_fraction)))
    return Corpus(train=tokens[:-n_val], val=tokens[-n_val:],
                  sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), n_files=n_files, root=base)


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``x = data[i:i+T]``, ``y = data[i+1:i+T+1]`` as int64 ``(B, T)`` tensors.

    The offsets ``i`` come from ``generator`` (a CPU generator), so equal generator states give
    equal batches.
    """
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
    if data.numel() < block_size + 1:
        raise ValueError(f"data has {data.numel()} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = torch.randint(data.numel() - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size + 1)  # (T+1,)
    windows = data[starts[:, None] + offsets].long()  # (B, T+1)
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) each
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
