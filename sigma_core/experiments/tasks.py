"""What each model trains on: one small interface over three data sources, nothing downloaded.

- :class:`LanguageModelTask` (``model="gpt"``): random windows of the CPython standard-library
  bytes (:mod:`sigma_core.experiments.data`);
- :class:`DigitsTask` (``model="vit"``): scikit-learn's bundled 8x8 handwritten digits
  (``sklearn.datasets.load_digits``, 1 797 images of 10 classes), split once into train and
  test with a fixed seed (stratified, independent of the run's seed), pixels scaled to [0, 1]
  and standardised with the training set's mean and standard deviation;
- :class:`SequenceTask` (``model="seq2seq"``): reverse (or copy) a sequence of ``block_size``
  symbols drawn uniformly from ``vocab_size``; every training batch is freshly generated from
  the run's data generator, the held-out set (``eval_batches * batch_size`` sequences) from a
  fixed seed;
- :class:`~sigma_core.experiments.speech.SpokenDigitsTask` (``model="speech"``): espeak-ng
  spoken digit strings as log-mel frames, split into train / validation / test by utterance
  (:mod:`sigma_core.experiments.speech_data`); the held-out set is the validation split, and
  with ``test_split`` the test split is the utterances held out for testing;
- :class:`~sigma_core.experiments.ssl_task.ContrastiveDigitsTask` (``model="vit-simclr"``): the
  digits images as pairs of augmented views (SimCLR), with a linear probe on the frozen
  representation as the held-out accuracy.

With ``test_split=True`` (the config's ``test_split``) every task also holds out a *test* split,
disjoint from the validation split that ``eval_batches`` gives (so a learning rate chosen on
validation is reported on data it was not chosen on): the digits' held-out images are split in
two halves (stratified, fixed seed), validation and test; the sequence task draws its test set
from another fixed seed; the GPT's held-out bytes are split into a first half (validation) and a
second half (test).  Without it the held-out data are what they always were (``test_batches``
is then ``None``).

Every task gives training batches from a caller-owned :class:`torch.Generator` (so the data
order is saved and restored with the generator's state), fixed held-out batches, a fixed batch
for the per-row samples, its provenance (``describe()``, ``sha256``) and, for the classifiers,
the number of correct predictions.

Example
-------
>>> from sigma_core.experiments.config import preset
>>> task = make_task(preset("seq2seq-smoke"))
>>> x, y = task.train_batch(4, torch.Generator().manual_seed(0))
>>> bool((y == x.flip(1)).all()), tuple(x.shape) == (4, task.block_size)
(True, True)
>>> digits = DigitsTask(test_fraction=0.2)
>>> digits.train_x.shape[1:], digits.n_train + digits.n_test
(torch.Size([1, 8, 8]), 1797)
>>> split = DigitsTask(test_fraction=0.2, test_split=True)
>>> split.n_train, split.n_test, split.n_final_test  # validation and test: 180 images each
(1437, 180, 180)
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch

from sigma_core.experiments.data import Corpus, get_batch, load_stdlib_corpus

#: seed of the digits train/test split and of the synthetic held-out sequences (never the run's)
SPLIT_SEED = 0
HELD_OUT_SEED = 20230306


class LanguageModelTask:
    """Next-byte prediction on the stdlib corpus (the GPT's task)."""

    name = "cpython-stdlib-bytes"

    def __init__(self, corpus: Corpus, cfg):
        self.corpus, self.cfg = corpus, cfg
        self.sha256 = corpus.sha256
        self.tokens_per_example = cfg.block_size
        self.val, self.test = corpus.val, None
        if getattr(cfg, "test_split", False):
            half = corpus.val.numel() // 2
            if half < cfg.block_size + 2:
                raise ValueError(f"test_split needs at least {2 * (cfg.block_size + 2)} held-out bytes "
                                 f"(two halves of more than block_size + 1), got {corpus.val.numel()}")
            self.val, self.test = corpus.val[:half], corpus.val[half:]

    def describe(self) -> dict:
        return self.corpus.describe()

    def config_fields(self) -> dict:
        """Extra provenance fields of config.json (kept under their historical names)."""
        return {"corpus": self.describe(), "corpus_sha256": self.sha256, "corpus_size": self.corpus.size}

    def train_batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        return get_batch(self.corpus.train, batch_size, self.cfg.block_size, generator, device)

    def eval_batches(self, device="cpu"):
        g = torch.Generator().manual_seed(self.cfg.seed + 2)
        return [get_batch(self.val, self.cfg.batch_size, self.cfg.block_size, g, device)
                for _ in range(self.cfg.eval_batches)]

    def test_batches(self, device="cpu"):
        """Batches of the test half of the held-out bytes (``None`` without ``test_split``)."""
        if self.test is None:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed + 4)
        return [get_batch(self.test, self.cfg.batch_size, self.cfg.block_size, g, device)
                for _ in range(self.cfg.eval_batches)]

    def sample_inputs(self, device="cpu") -> tuple:
        g = torch.Generator().manual_seed(self.cfg.seed + 3)
        x, _ = get_batch(self.corpus.val, self.cfg.sample_batch, self.cfg.block_size, g, device)
        return (x,)  # (B, T)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
        return None


@functools.lru_cache(maxsize=2)
def _digits(test_fraction: float):
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(images, data.target, test_size=test_fraction,
                                              random_state=SPLIT_SEED, stratify=data.target)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    digest = hashlib.sha256(images.tobytes() + data.target.astype(np.int64).tobytes()).hexdigest()
    return ((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, digest)


class DigitsTask:
    """scikit-learn's 8x8 digits, a fixed stratified train/test split (the ViT's task)."""

    name = "sklearn-digits-8x8"

    def __init__(self, test_fraction: float = 0.2, *, batch_size: int = 64, sample_batch: int = 8,
                 test_split: bool = False):
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        x_tr, y_tr, x_te, y_te, self.sha256 = _digits(float(test_fraction))
        self.final_test_x = self.final_test_y = None
        if test_split:  # the held-out images: half validation (test_x), half test (final_test_x)
            from sklearn.model_selection import train_test_split  # noqa: PLC0415

            x_te, x_fin, y_te, y_fin = train_test_split(x_te, y_te, test_size=0.5, random_state=SPLIT_SEED,
                                                        stratify=y_te)
            self.final_test_x = torch.from_numpy(x_fin).unsqueeze(1)
            self.final_test_y = torch.from_numpy(y_fin).long()
        self.train_x = torch.from_numpy(x_tr).unsqueeze(1)  # (N, 1, 8, 8)
        self.train_y = torch.from_numpy(y_tr).long()  # (N,)
        self.test_x = torch.from_numpy(x_te).unsqueeze(1)
        self.test_y = torch.from_numpy(y_te).long()
        self.n_train, self.n_test = len(self.train_y), len(self.test_y)
        self.n_final_test = 0 if self.final_test_y is None else len(self.final_test_y)
        self.test_fraction, self.batch_size, self.sample_batch = test_fraction, batch_size, sample_batch
        self.tokens_per_example = 1  # one image per example (throughput is in images/s)

    def describe(self) -> dict:
        import sklearn  # noqa: PLC0415

        return {"source": self.name, "sklearn": sklearn.__version__, "sha256": self.sha256,
                "n_train": self.n_train, "n_test": self.n_test, "split_seed": SPLIT_SEED,
                "test_fraction": self.test_fraction,
                **({"n_validation": self.n_test, "n_final_test": self.n_final_test} if self.n_final_test else {})}

    def config_fields(self) -> dict:
        return {"data": self.describe(), "data_sha256": self.sha256}

    def train_batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        idx = torch.randint(self.n_train, (batch_size,), generator=generator)  # (B,)
        return self.train_x[idx].to(device), self.train_y[idx].to(device)

    def eval_batches(self, device="cpu"):
        """The whole held-out set (with ``test_split``: its validation half), in batches of ``batch_size``."""
        return [(self.test_x[i:i + self.batch_size].to(device), self.test_y[i:i + self.batch_size].to(device))
                for i in range(0, self.n_test, self.batch_size)]

    def test_batches(self, device="cpu"):
        """The test half of the held-out images (``None`` without ``test_split``)."""
        if self.final_test_y is None:
            return None
        return [(self.final_test_x[i:i + self.batch_size].to(device),
                 self.final_test_y[i:i + self.batch_size].to(device))
                for i in range(0, self.n_final_test, self.batch_size)]

    def sample_inputs(self, device="cpu") -> tuple:
        return (self.test_x[: self.sample_batch].to(device),)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        return int((logits.argmax(-1) == y).sum()), int(y.numel())


class SequenceTask:
    """Reverse or copy ``block_size`` random symbols of ``vocab_size`` (the seq2seq task)."""

    def __init__(self, kind: str = "reverse", *, vocab_size: int = 16, block_size: int = 12,
                 batch_size: int = 32, eval_batches: int = 4, sample_batch: int = 4, test_split: bool = False):
        if kind not in ("reverse", "copy"):
            raise ValueError(f"kind must be 'reverse' or 'copy', got {kind!r}")
        self.kind, self.vocab_size, self.block_size = kind, vocab_size, block_size
        self.name = f"synthetic-{kind}"
        self.batch_size, self.n_eval, self.sample_batch = batch_size, eval_batches, sample_batch
        g = torch.Generator().manual_seed(HELD_OUT_SEED)
        self.held_out = [self._make(batch_size, g) for _ in range(eval_batches)]
        g_test = torch.Generator().manual_seed(HELD_OUT_SEED + 1)
        self.test_set = [self._make(batch_size, g_test) for _ in range(eval_batches)] if test_split else None
        h = hashlib.sha256(f"{kind}:{vocab_size}:{block_size}:{HELD_OUT_SEED}".encode())
        for x, _ in self.held_out:
            h.update(x.numpy().tobytes())
        self.sha256 = h.hexdigest()
        self.tokens_per_example = 2 * block_size  # source + target

    def _make(self, batch_size: int, generator: torch.Generator):
        x = torch.randint(self.vocab_size, (batch_size, self.block_size), generator=generator)  # (B, L)
        return x, (x.flip(1) if self.kind == "reverse" else x.clone())

    def describe(self) -> dict:
        return {"source": self.name, "vocab_size": self.vocab_size, "length": self.block_size,
                "held_out_seed": HELD_OUT_SEED, "n_held_out": self.batch_size * self.n_eval,
                "sha256": self.sha256}

    def config_fields(self) -> dict:
        return {"data": self.describe(), "data_sha256": self.sha256}

    def train_batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        x, y = self._make(batch_size, generator)
        return x.to(device), y.to(device)

    def eval_batches(self, device="cpu"):
        return [(x.to(device), y.to(device)) for x, y in self.held_out]

    def test_batches(self, device="cpu"):
        """Held-out sequences from another fixed seed (``None`` without ``test_split``)."""
        if self.test_set is None:
            return None
        return [(x.to(device), y.to(device)) for x, y in self.test_set]

    def sample_inputs(self, device="cpu") -> tuple:
        x, y = self.held_out[0]
        return x[: self.sample_batch].to(device), y[: self.sample_batch].to(device)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """Correct target tokens under teacher forcing."""
        return int((logits.argmax(-1) == y).sum()), int(y.numel())


def make_task(cfg, corpus: Corpus | None = None):
    """The task of a :class:`~sigma_core.experiments.config.TrainConfig` (``corpus``: a pre-loaded
    stdlib corpus for the GPT)."""
    if cfg.model == "gpt":
        return LanguageModelTask(corpus if corpus is not None else
                                 load_stdlib_corpus(cfg.corpus_bytes, cfg.val_fraction), cfg)
    if corpus is not None:
        raise ValueError(f"corpus is only used by model='gpt', got model={cfg.model!r}")
    if cfg.model == "vit":
        return DigitsTask(cfg.val_fraction, batch_size=cfg.batch_size, sample_batch=cfg.sample_batch,
                          test_split=cfg.test_split)
    if cfg.model == "seq2seq":
        return SequenceTask(cfg.seq_task, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                            batch_size=cfg.batch_size, eval_batches=cfg.eval_batches,
                            sample_batch=cfg.sample_batch, test_split=cfg.test_split)
    if cfg.model == "speech":
        from sigma_core.experiments.speech import SpokenDigitsTask  # noqa: PLC0415

        return SpokenDigitsTask(cfg)
    if cfg.model == "vit-simclr":
        from sigma_core.experiments.ssl_task import ContrastiveDigitsTask  # noqa: PLC0415

        return ContrastiveDigitsTask(cfg.val_fraction, batch_size=cfg.batch_size, sample_batch=cfg.sample_batch,
                                     test_split=cfg.test_split)
    raise ValueError(f"model must be one of ('gpt', 'vit', 'seq2seq', 'speech', 'vit-simclr'), got {cfg.model!r}")
