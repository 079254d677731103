"""The self-supervised task of ``model="vit-simclr"``: SimCLR views of the 8x8 digits and a linear probe.

The images are those of :class:`~sigma_core.experiments.tasks.DigitsTask` (scikit-learn's 8x8
digits, the same fixed stratified split; with ``test_split`` the held-out images are halved into
validation and test).  Training never sees a label: a training batch is ``batch_size`` training
images drawn with the run's data generator, each seen as two views made by :func:`augment`
(a random shift of up to :data:`MAX_SHIFT` pixels with background padding, a random contrast
factor in :data:`CONTRAST`, Gaussian pixel noise of standard deviation :data:`NOISE_STD`, in the
standardised pixel units), trained with NT-Xent (:mod:`sigma_core.models.simclr`).

Evaluation (every ``eval_every`` steps and at the end) reports two numbers:

- ``val_loss``: the NT-Xent loss on fixed views of the validation images, in batches of
  ``batch_size`` (which must divide each held-out split, so that every batch has the chance loss
  ``log(2 batch_size - 1)``);
- ``val_accuracy``: a *linear probe* on the frozen representation (the class token): ridge
  regression onto one-hot labels (closed form, ``ridge`` :data:`PROBE_RIDGE`, features
  standardised with the training images' mean and standard deviation, a bias column), fitted on
  the clean training images and their labels at that evaluation, scored on the clean validation
  images; with ``test_split`` the last step also scores the test half (``test_accuracy``).

Example
-------
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.zeros(4, 1, 8, 8)
>>> tuple(augment(x, g, background=0.0).shape)
(4, 1, 8, 8)
>>> feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
>>> probe = fit_ridge_probe(feats, torch.tensor([0, 0, 1, 1]), n_classes=2, ridge=1e-3)
>>> probe.predict(torch.tensor([[0.05, 0.0], [4.9, 5.2]])).tolist()
[0, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sigma_core.experiments.tasks import HELD_OUT_SEED, DigitsTask

#: largest random shift of a view, in pixels (each axis, uniform in -MAX_SHIFT..MAX_SHIFT)
MAX_SHIFT = 1
#: range of the random contrast factor around the background
CONTRAST = (0.6, 1.4)
#: standard deviation of the Gaussian pixel noise (standardised pixels have standard deviation 1)
NOISE_STD = 0.25
#: the ridge of the linear probe (on standardised features)
PROBE_RIDGE = 1.0


def augment(images: torch.Tensor, generator: torch.Generator, *, background: float) -> torch.Tensor:
    """One random view of each image ``(N, C, H, W)``: shifted by up to :data:`MAX_SHIFT` pixels
    (the uncovered border is ``background``), contrast scaled about ``background`` by a factor in
    :data:`CONTRAST`, plus Gaussian noise of :data:`NOISE_STD`; every draw from ``generator``."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    N, C, H, W = images.shape
    s = MAX_SHIFT
    padded = torch.full((N, C, H + 2 * s, W + 2 * s), float(background), dtype=images.dtype)
    padded[:, :, s:s + H, s:s + W] = images
    oy = torch.randint(2 * s + 1, (N,), generator=generator)  # (N,) crop offsets
    ox = torch.randint(2 * s + 1, (N,), generator=generator)
    rows = (oy[:, None] + torch.arange(H))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox[:, None] + torch.arange(W))[:, None, None, :]  # (N, 1, 1, W)
    n = torch.arange(N)[:, None, None, None]
    ch = torch.arange(C)[None, :, None, None]
    view = padded[n, ch, rows, cols]  # (N, C, H, W)
    lo, hi = CONTRAST
    factor = lo + (hi - lo) * torch.rand((N, 1, 1, 1), generator=generator, dtype=images.dtype)
    view = background + (view - background) * factor
    return view + NOISE_STD * torch.randn(view.shape, generator=generator, dtype=images.dtype)


@dataclass(frozen=True)
class RidgeProbe:
    """A fitted linear probe: standardisation (``mean``, ``std``) and weights ``(d + 1, n_classes)``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        x = (feats.double() - self.mean) / self.std  # (N, d)
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ self.weight  # (N, classes)

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scores(feats).argmax(-1)


def fit_ridge_probe(feats: torch.Tensor, labels: torch.Tensor, *, n_classes: int = 10,
                    ridge: float = PROBE_RIDGE) -> RidgeProbe:
    """Ridge regression of one-hot ``labels`` on standardised ``feats`` ``(N, d)`` plus a bias,
    in closed form, ``W = (X^T X + ridge I)^{-1} X^T Y`` (float64; the bias is not penalised)."""
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
        raise ValueError(f"feats must be (N, d) and labels (N,), got {tuple(feats.shape)} and {tuple(labels.shape)}")
    if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and 0 < ridge < math.inf):
        raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, n_classes = {n_classes}), got {int(labels.min())}..{int(labels.max())}")
    f = feats.detach().double().cpu()
    mean, std = f.mean(0), f.std(0).clamp_min(1e-8)
    x = torch.cat([(f - mean) / std, torch.ones(len(f), 1, dtype=f.dtype)], 1)  # (N, d + 1)
    y = torch.nn.functional.one_hot(labels.cpu().long(), n_classes).double()  # (N, classes)
    penalty = ridge * torch.eye(x.shape[1], dtype=f.dtype)
    penalty[-1, -1] = 0.0
    weight = torch.linalg.solve(x.T @ x + penalty, x.T @ y)
    return RidgeProbe(mean, std, weight)


class ContrastiveDigitsTask(DigitsTask):
    """SimCLR views of the digits for training, NT-Xent and a linear probe for evaluation (module docstring)."""

    name = "sklearn-digits-8x8-simclr"

    def __init__(self, test_fraction: float = 0.2, *, batch_size: int = 60, sample_batch: int = 8,
                 test_split: bool = False):
        super().__init__(test_fraction, batch_size=batch_size, sample_batch=sample_batch, test_split=test_split)
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (NT-Xent needs a negative), got {batch_size}")
        for split, n in (("validation", self.n_test), ("test", self.n_final_test)):
            if n and n % batch_size:
                raise ValueError(f"batch_size ({batch_size}) must divide the {split} images ({n}) so that every "
                                 f"held-out NT-Xent batch has the same chance loss log(2 batch_size - 1)")
        self.background = float(self.train_x.min())  # the standardised value of a blank pixel
        self._held = self._views(self.test_x, self.test_y, HELD_OUT_SEED)
        self._test = None if self.final_test_y is None else self._views(self.final_test_x, self.final_test_y,
                                                                         HELD_OUT_SEED + 1)
        self.probe: RidgeProbe | None = None

    def _views(self, x, y, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for i in range(0, len(y), self.batch_size):
            xs = x[i:i + self.batch_size]
            views = torch.stack([xs, augment(xs, g, background=self.background),
                                 augment(xs, g, background=self.background)], 1)  # (B, 3, 1, 8, 8)
            out.append((views, y[i:i + self.batch_size]))
        return out

    def describe(self) -> dict:
        from sigma_core.models.simclr import PROJ_DIM, TEMPERATURE  # noqa: PLC0415

        return {**super().describe(), "source": self.name, "views": 2, "max_shift": MAX_SHIFT,
                "contrast": list(CONTRAST), "noise_std": NOISE_STD, "temperature": TEMPERATURE,
                "proj_dim": PROJ_DIM, "probe": "ridge", "probe_ridge": PROBE_RIDGE,
                "chance_loss": math.log(2 * self.batch_size - 1)}

    def train_batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        idx = torch.randint(self.n_train, (batch_size,), generator=generator)  # (B,)
        x = self.train_x[idx]
        views = torch.stack([augment(x, generator, background=self.background),
                             augment(x, generator, background=self.background)], 1)  # (B, 2, 1, 8, 8)
        return views.to(device), self.train_y[idx].to(device)  # the labels are not used by the loss

    def prepare_eval(self, model, device="cpu") -> None:
        """Fit the linear probe on the frozen representation of the clean training images."""
        with torch.no_grad():
            feats = torch.cat([model.features(self.train_x[i:i + 256].to(device)).float().cpu()
                               for i in range(0, self.n_train, 256)])
        self.probe = fit_ridge_probe(feats, self.train_y) if torch.isfinite(feats).all() else None

    def eval_batches(self, device="cpu"):
        return [(x.to(device), y.to(device)) for x, y in self._held]

    def test_batches(self, device="cpu"):
        if self._test is None:
            return None
        return [(x.to(device), y.to(device)) for x, y in self._test]

    def correct(self, feats: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """Probe predictions on the clean images' representations ``feats`` (none right without a finite probe)."""
        if self.probe is None or not torch.isfinite(feats).all():
            return 0, int(y.numel())
        return int((self.probe.predict(feats.float().cpu()) == y.cpu()).sum()), int(y.numel())
