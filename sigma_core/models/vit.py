"""A small Vision Transformer with observable attention (for the 8x8 digits).

Patch embedding (a ``Conv2d`` with kernel = stride = ``patch_size``), a learned class token and
learned positions, ``n_layer`` encoder blocks (the blocks of :mod:`sigma_core.models.gpt`, with
bidirectional attention) with the normalisation before (``"pre"``, the usual ViT), after
(``"post"``) or nowhere (``"none"``), and a linear classifier on the class token.  No dropout.
Attention follows the probe protocol of :mod:`sigma_core.probe`, so
:class:`~sigma_core.monitor.EntropyMonitor` and the training loop see every head.

Example
-------
>>> torch.manual_seed(0) and None
>>> model = ViT(ViTConfig(d_model=16, n_layer=2, n_head=2, patch_size=2))
>>> images, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
>>> logits, loss = model(images, labels)
>>> tuple(logits.shape), model.n_tokens, bool(loss > 0)
((3, 10), 17, True)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.models.gpt import Block, CausalSelfAttention, ModelConfig


@dataclass(frozen=True)
class ViTConfig:
    """Shape of the :class:`ViT`: image, patches, width, depth, heads, norm placement, classes."""

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    n_classes: int = 10
    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    norm: str = "pre"
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "n_classes", "d_model", "n_layer",
                     "n_head", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.norm not in ("pre", "post", "none"):
            raise ValueError(f"norm must be 'pre', 'post' or 'none', got {self.norm!r}")


class ViT(nn.Module):
    """Image classifier; ``forward(images (B, C, H, W), labels=None) -> (logits (B, n_classes), loss)``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if not isinstance(cfg, ViTConfig):
            raise TypeError(f"cfg must be a ViTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + class token
        self.patch_emb = nn.Conv2d(cfg.in_channels, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_emb = nn.Parameter(torch.zeros(1, self.n_tokens, cfg.d_model))
        block_cfg = ModelConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                block_size=self.n_tokens, norm=cfg.norm, mlp_ratio=cfg.mlp_ratio)
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(cfg.n_layer))
        for block in self.blocks:
            block.attn.causal = False  # every patch sees every patch
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def attention_modules(self) -> list[CausalSelfAttention]:
        """The attention module of each block, in layer order."""
        return [block.attn for block in self.blocks]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images must have shape (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}), got {tuple(images.shape)}")
        B = images.shape[0]
        x = self.patch_emb(images).flatten(2).transpose(1, 2)  # (B, P, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_emb  # (B, P+1, C)
        for block in self.blocks:
            x = block(x)  # (B, P+1, C)
        logits = self.head(self.ln_f(x[:, 0]))  # (B, n_classes)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss


def build_vit(cfg, n_classes: int = 10) -> ViT:
    """The :class:`ViT` of a flat :class:`~sigma_core.experiments.config.TrainConfig` (not reparametrised)."""
    names = {f.name for f in dataclasses.fields(ViTConfig)} - {"image_size", "in_channels", "n_classes"}
    return ViT(ViTConfig(n_classes=n_classes, **{n: getattr(cfg, n) for n in names}))
