"""Byte-level training data, the same on every machine: a shipped CPython standard-library snapshot.

The corpus is a fixed file that ships with the package, ``corpus/stdlib-3.11.7.bin.xz`` beside
this module: the ``*.py`` files of CPython 3.11.7's standard library, sorted by their path
relative to the library directory, concatenated and cut to the first 8 MiB (8 388 608 bytes),
xz-compressed (1.3 MB).  Every load checks the SHA-256 of the uncompressed bytes against
:data:`CORPUS_SHA256` and refuses a file that does not match (:class:`CorpusError`), so a run
on any machine and any Python version trains on exactly these bytes.  ``corpus/manifest.json``
lists the contributing files, ``corpus/LICENSE-CPython.txt`` is their licence (the PSF License
Agreement), and ``corpus/build_corpus.py`` rebuilds the file from a CPython 3.11.7 installation.

A run uses the first ``corpus_bytes`` bytes of it; the last ``val_fraction`` of those is held out
for the validation loss.  :meth:`Corpus.describe` (written into every run's ``config.json``) holds
the size, SHA-256 and number of files of the prefix used, and no path of the machine.

Batches are random windows drawn with a caller-owned :class:`torch.Generator`, so the data order
is a pure function of the generator's state (and can be saved and restored with it).

Example
-------
>>> corpus = load_stdlib_corpus(max_bytes=4096)
>>> corpus.size, corpus.sha256[:12], corpus.train.numel() + corpus.val.numel() == corpus.size
(4096, 'f471aa37246d', True)
>>> g = torch.Generator().manual_seed(0)
>>> x, y = get_batch(corpus.train, batch_size=2, block_size=8, generator=g)
>>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())  # targets are inputs shifted by one
((2, 8), True)
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import torch

#: the directory of the shipped corpus (inside the installed package)
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
#: the compressed corpus file's name
CORPUS_FILE = "stdlib-3.11.7.bin.xz"
#: its uncompressed size in bytes (8 MiB)
CORPUS_SIZE = 8 * 2**20
#: SHA-256 of the uncompressed bytes, checked on every load
CORPUS_SHA256 = "4bec1bd5ca08aed8bbc2c8ea524433cc24585fdce4c938cbc2697eaa33672350"
#: what the bytes are, as recorded in every run's config.json
CORPUS_SOURCE = "CPython 3.11.7 standard library *.py, sorted by relative path (shipped: " + CORPUS_FILE + ")"


class CorpusError(ValueError):
    """The shipped corpus file is missing, unreadable or not the expected bytes."""


@dataclass(frozen=True)
class Corpus:
    """Byte tokens split into ``train`` and held-out ``val`` (uint8 tensors) and their provenance."""

    train: torch.Tensor
    val: torch.Tensor
    sha256: str
    size: int
    n_files: int
    source: str = CORPUS_SOURCE

    def describe(self) -> dict:
        """JSON-ready provenance: source, size in bytes, SHA-256, number of files, split sizes."""
        return {"source": self.source, "size": self.size, "sha256": self.sha256,
                "n_files": self.n_files, "full_corpus_sha256": CORPUS_SHA256,
                "train_bytes": int(self.train.numel()), "val_bytes": int(self.val.numel())}


def _fix_hint() -> str:
    return ("reinstall the package (pip install --force-reinstall entropy-collapse, or `make env` "
            "in a clone) or restore the file from the repository (git checkout -- "
            f"sigma_core/experiments/corpus/{CORPUS_FILE})")


@functools.lru_cache(maxsize=1)
def shipped_corpus_bytes() -> bytes:
    """The whole shipped corpus (8 MiB), decompressed and checked against :data:`CORPUS_SHA256`.

    Raises :class:`CorpusError` naming the file and how to restore it when the file is missing,
    is not valid xz data, or decompresses to other bytes than the expected ones.
    """
    path = CORPUS_DIR / CORPUS_FILE
    try:
        raw = lzma.decompress(path.read_bytes())
    except FileNotFoundError:
        raise CorpusError(f"the training corpus {path} is missing; {_fix_hint()}") from None
    except lzma.LZMAError as exc:
        raise CorpusError(f"the training corpus {path} is corrupted (not valid xz data: {exc}); "
                          f"{_fix_hint()}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) != CORPUS_SIZE or digest != CORPUS_SHA256:
        raise CorpusError(f"the training corpus {path} is not the expected data ({len(raw)} bytes, "
                          f"sha256 {digest[:16]}..., expected {CORPUS_SIZE} bytes, sha256 "
                          f"{CORPUS_SHA256[:16]}...); {_fix_hint()}")
    return raw


@functools.lru_cache(maxsize=1)
def corpus_manifest() -> dict:
    """``corpus/manifest.json``: source, licence, SHA-256 and ``files`` (relative path -> bytes used)."""
    return json.loads((CORPUS_DIR / "manifest.json").read_text())


def _n_files(max_bytes: int) -> int:
    """How many of the manifest's files contribute to the first ``max_bytes`` bytes."""
    total = 0
    for n, used in enumerate(corpus_manifest()["files"].values(), start=1):
        total += used
        if total >= max_bytes:
            return n
    return len(corpus_manifest()["files"])


def load_corpus(max_bytes: int = CORPUS_SIZE, val_fraction: float = 0.1) -> Corpus:
    """The first ``max_bytes`` bytes of the shipped corpus, holding out the last ``val_fraction``.

    ``max_bytes`` must be an integer in [2, 8 388 608]; ``val_fraction`` must lie in (0, 1).
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or not 2 <= max_bytes <= CORPUS_SIZE:
        raise ValueError(f"max_bytes must be an integer in [2, {CORPUS_SIZE}] (the shipped corpus "
                         f"holds {CORPUS_SIZE} bytes), got {max_bytes!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    raw = shipped_corpus_bytes()[:max_bytes]
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # (N,)
    n_val = max(1, int(round(len(raw) * val_fraction)))
    return Corpus(train=tokens[:-n_val], val=tokens[-n_val:],
                  sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), n_files=_n_files(max_bytes))


def load_stdlib_corpus(max_bytes: int = CORPUS_SIZE, val_fraction: float = 0.1) -> Corpus:
    """The historical name of :func:`load_corpus` (same arguments, same result).

    It no longer reads the local Python's standard library: the bytes come from the shipped
    snapshot of CPython 3.11.7's, identical on every machine.
    """
    return load_corpus(max_bytes, val_fraction)


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
