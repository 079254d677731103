"""SimCLR on the small ViT: two augmented views per image, a projection head, the NT-Xent loss.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020
(arXiv 2002.05709), eq. (1): for a batch of ``B`` images seen as ``2B`` views, the loss of the
positive pair ``(i, j)`` (two views of one image) is

.. math::

    \\ell_{i,j} = -\\log \\frac{\\exp(\\mathrm{sim}(z_i, z_j)/\\tau)}
                               {\\sum_{k \\ne i} \\exp(\\mathrm{sim}(z_i, z_k)/\\tau)},

``sim`` the cosine similarity of the projections ``z`` and ``tau`` the temperature; the NT-Xent
loss is its mean over all ``2B`` ordered positive pairs.  A model whose projections carry no
information (all equal) scores ``log(2B - 1)``, the *chance* loss of the objective.

:class:`SimCLRViT` is the :class:`~sigma_core.models.vit.ViT` backbone (its class token after
the final norm is the representation) followed by a two-layer MLP projection head (Chen et al.,
Sec. 2.1).  ``forward(views, labels=None)`` takes ``views`` of shape ``(B, V, C, H, W)``,
``V >= 2``: the loss is the NT-Xent of the *last two* views, and the output is the representation
of view 0 (``(B, d_model)``; the evaluation passes the clean image there, for the linear
probe).  Labels are never used by the loss (self-supervised); they are accepted for the training
loop's ``model(x, y)`` call.  Images of shape ``(B, C, H, W)`` give their representation and no
loss.  Zhai et al. (ICML 2023), Sec. 5.4, train SimCLR ViTs with and without sigmaReparam.

Example
-------
>>> torch.manual_seed(0) and None
>>> from sigma_core.models.vit import ViTConfig
>>> model = SimCLRViT(ViTConfig(d_model=16, n_layer=1, n_head=2, patch_size=4))
>>> feats, loss = model(torch.randn(5, 2, 1, 8, 8))
>>> tuple(feats.shape), abs(float(loss) - math.log(2 * 5 - 1)) < 0.1  # near chance at initialisation
((5, 16), True)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.models.vit import ViT, ViTConfig

#: NT-Xent temperature (SimCLR's CIFAR-10 setting is 0.5; 0.2 is the value of its ImageNet ablation)
TEMPERATURE = 0.2
#: width of the projection head's output
PROJ_DIM = 32


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The NT-Xent loss (module docstring) of the paired projections ``z1``, ``z2`` (each ``(B, p)``,
    row i of both from one image), averaged over the ``2B`` ordered positive pairs.

    >>> z = torch.eye(3)
    >>> float(nt_xent(z, z, temperature=1.0)) < float(nt_xent(z, z.roll(1, 0), temperature=1.0))
    True
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be (B, p) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"z1 must hold at least 2 rows (one positive and one negative per view), got {z1.shape[0]}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2B, p)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)  # (2B,) the other view
    return F.cross_entropy(sim, target)


class SimCLRViT(nn.Module):
    """The ViT backbone and a projection head trained with NT-Xent (module docstring)."""

    def __init__(self, cfg: ViTConfig, *, proj_dim: int = PROJ_DIM, temperature: float = TEMPERATURE):
        super().__init__()
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.backbone = ViT(cfg)
        self.backbone.head = nn.Identity()  # the representation is the class token, no classifier
        self.cfg, self.temperature = cfg, float(temperature)
        self.projection = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(),
                                        nn.Linear(cfg.d_model, proj_dim))
        for module in self.projection:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def attention_modules(self):
        """The backbone's attention modules, in layer order (what the entropy monitor watches)."""
        return self.backbone.attention_modules()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The representation of ``images`` ``(B, C, H, W)``: the class token after the final norm, ``(B, d)``."""
        feats, _ = self.backbone(images)  # head is the identity: (B, d)
        return feats

    def forward(self, views: torch.Tensor, labels: torch.Tensor | None = None):
        c = self.cfg
        if views.ndim == 4:  # plain images: their representation
            return self.features(views), None
        if views.ndim != 5 or views.shape[1] < 2 or views.shape[2:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"views must have shape (B, V >= 2, {c.in_channels}, {c.image_size}, {c.image_size}) "
                             f"or be images (B, {c.in_channels}, {c.image_size}, {c.image_size}), got {tuple(views.shape)}")
        B, V = views.shape[:2]
        feats = self.features(views.flatten(0, 1)).unflatten(0, (B, V))  # (B, V, d)
        z = self.projection(feats[:, -2:])  # (B, 2, p)
        return feats[:, 0], nt_xent(z[:, 0], z[:, 1], self.temperature)


def build_simclr_vit(cfg) -> SimCLRViT:
    """The :class:`SimCLRViT` of a flat :class:`~sigma_core.experiments.config.TrainConfig` (not reparametrised)."""
    import dataclasses  # noqa: PLC0415

    names = {f.name for f in dataclasses.fields(ViTConfig)} - {"image_size", "in_channels", "n_classes"}
    return SimCLRViT(ViTConfig(**{n: getattr(cfg, n) for n in names}))
