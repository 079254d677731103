"""A Transformer encoder with CTC for speech recognition (the paper's speech shape, small).

Log-mel frames ``(B, F, n_mels)`` are stacked in fours (80 ms tokens), projected to
``d_model``, added to fixed sinusoidal positions and passed through ``n_layer`` bidirectional
Transformer blocks of :mod:`sigma_core.models.gpt` (normalisation after each residual addition
by default, ``"post"``: the deep post-LN shape the paper trains with sigmaReparam), then a
linear layer to ``n_symbols + 1`` classes (class 0 is the CTC blank, symbol s is class s + 1).
The loss is ``torch.nn.functional.ctc_loss`` (mean over the batch of the per-utterance loss
divided by its target length) with every token an input frame.  Targets are ``(B, S)`` symbol
indices padded with -1.  :func:`greedy_decode` is best-path decoding (argmax per token, repeats
merged, blanks dropped).

Every attention module follows the probe protocol of :mod:`sigma_core.probe`, so
:class:`~sigma_core.monitor.EntropyMonitor` sees every head.

Example
-------
>>> torch.manual_seed(0) and None
>>> model = SpeechCTC(SpeechConfig(n_mels=8, d_model=16, n_layer=2, n_head=2, block_size=6))
>>> feats = torch.randn(3, 16, 8)                 # (B, frames, n_mels): 16 frames -> 4 tokens
>>> labels = torch.tensor([[1, 2, -1], [3, 3, 4], [0, -1, -1]])
>>> logits, loss = model(feats, labels)
>>> tuple(logits.shape), len(model.attention_modules()), bool(loss > 0)
((3, 4, 11), 2, True)
>>> greedy_decode(torch.tensor([[0, 2, 2, 0, 2, 3, 0]]))   # blank 0; classes 2, 2, 3 -> symbols 1, 1, 2
[[1, 1, 2]]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.models.gpt import Block, CausalSelfAttention, ModelConfig

#: input frames per encoder token
STACK = 4


@dataclass(frozen=True)
class SpeechConfig:
    """Shape of :class:`SpeechCTC`: features, symbols, width, depth, heads, tokens, norm placement."""

    n_mels: int = 32
    n_symbols: int = 10
    d_model: int = 64
    n_layer: int = 8
    n_head: int = 4
    block_size: int = 32  # encoder tokens (input frames / STACK) at most
    norm: str = "post"
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("n_mels", "n_symbols"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        ModelConfig(d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
                    block_size=self.block_size, norm=self.norm, mlp_ratio=self.mlp_ratio)


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """The Transformer's fixed positions ``(n, d)``: sin / cos of ``pos / 10000^(2i/d)``."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    out = torch.zeros(n, d)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return out


class SpeechCTC(nn.Module):
    """``forward(features (B, F, n_mels), labels (B, S) or None) -> (logits (B, F/2, n_symbols+1), loss)``."""

    def __init__(self, cfg: SpeechConfig):
        super().__init__()
        if not isinstance(cfg, SpeechConfig):
            raise TypeError(f"cfg must be a SpeechConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.frontend = nn.Linear(STACK * cfg.n_mels, cfg.d_model)
        self.register_buffer("pos", sinusoidal_positions(cfg.block_size, cfg.d_model), persistent=False)
        block_cfg = ModelConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                block_size=cfg.block_size, norm=cfg.norm, mlp_ratio=cfg.mlp_ratio)
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(cfg.n_layer))
        for block in self.blocks:
            block.attn.causal = False  # every token sees the whole utterance
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.n_symbols + 1)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def attention_modules(self) -> list[CausalSelfAttention]:
        """The attention module of each block, in layer order."""
        return [block.attn for block in self.blocks]

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None):
        cfg = self.cfg
        if features.ndim != 3 or features.shape[2] != cfg.n_mels:
            raise ValueError(f"features must have shape (B, frames, {cfg.n_mels}), got {tuple(features.shape)}")
        B, n_frames, _ = features.shape
        T = n_frames // STACK
        if T < 1 or T > cfg.block_size or n_frames % STACK:
            raise ValueError(f"features must hold a positive multiple of {STACK} frames, at most "
                             f"{STACK * cfg.block_size}, got {n_frames}")
        x = self.frontend(features.reshape(B, T, STACK * cfg.n_mels)) + self.pos[:T]  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.head(self.ln_f(x))  # (B, T, n_symbols + 1)
        if labels is None:
            return logits, None
        return logits, ctc_loss(logits, labels)


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CTC loss (blank 0, symbol s = class s + 1) of ``logits (B, T, C)`` against ``labels (B, S)``
    padded with -1, every token an input frame; ``torch.nn.functional.ctc_loss``, reduction mean."""
    B, T, _ = logits.shape
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C)
    target_lengths = (labels >= 0).sum(1)  # (B,)
    targets = torch.where(labels >= 0, labels + 1, torch.zeros_like(labels))  # (B, S), classes
    input_lengths = torch.full((B,), T, dtype=torch.long, device=logits.device)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean")


def greedy_decode(classes: torch.Tensor) -> list[list[int]]:
    """Best-path CTC decoding of ``classes (B, T)`` (argmax class per token): merge repeats, drop
    blanks (class 0), return the symbols (class - 1) of each utterance."""
    out = []
    for row in classes.tolist():
        seq, prev = [], None
        for c in row:
            if c != prev and c != 0:
                seq.append(c - 1)
            prev = c
        out.append(seq)
    return out


def build_speech(cfg, n_mels: int = 32, n_symbols: int = 10) -> SpeechCTC:
    """The :class:`SpeechCTC` of a flat :class:`~sigma_core.experiments.config.TrainConfig` (not reparametrised)."""
    return SpeechCTC(SpeechConfig(n_mels=n_mels, n_symbols=n_symbols, d_model=cfg.d_model, n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, block_size=cfg.block_size, norm=cfg.norm,
                                  mlp_ratio=cfg.mlp_ratio))
