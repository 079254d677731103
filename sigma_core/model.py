"""A minimal GPT: byte-level causal Transformer with observable attention.

Token and learned position embeddings, ``n_layer`` blocks (attention + GELU MLP x4) with the
normalisation placed before (``"pre"``), after (``"post"``) or nowhere (``"none"``), and a linear
head.  Attention has separate q/k/v/o projections, so a weight reparametrisation (sigmaReparam,
spectral norm) applies to each projection on its own, and it follows the probe protocol of
:mod:`sigma_core.probe`: observers see ``(x, q, k)`` and read the effective per-head weights
``W_Q[h], W_K[h]`` of theory/README.md eq. (1), ``q_h = x @ W_Q[h]``, whose product's spectral
norm (times the logit scale) is the sigma of the entropy bound.

Example
-------
>>> torch.manual_seed(0) and None
>>> model = GPT(ModelConfig(d_model=16, n_layer=2, n_head=2, block_size=8))
>>> idx = torch.randint(0, 256, (3, 8))
>>> logits, loss = model(idx, idx)
>>> tuple(logits.shape), bool(loss > 0)
((3, 8, 256), True)
>>> # causal: changing the last token leaves the logits of the earlier positions unchanged
>>> idx2 = idx.clone(); idx2[:, -1] = (idx2[:, -1] + 1) % 256
>>> bool(torch.allclose(model(idx2)[0][:, :-1], logits[:, :-1], atol=1e-6))
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.probe import AttentionProbe, probe_active


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the :class:`GPT`: vocabulary, width, depth, heads, context, norm placement."""

    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    block_size: int = 128
    norm: str = "pre"
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "block_size", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.norm not in ("pre", "post", "none"):
            raise ValueError(f"norm must be 'pre', 'post' or 'none', got {self.norm!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (no biases).

    Logits of head h: ``a = scale * (x W_Q[h]) (x W_K[h])^T`` with ``scale = 1/sqrt(d_head)``,
    masked causally, so row i sees its T_i = i + 1 keys (theory/README.md, notation).
    """

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.causal = True
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.probe = AttentionProbe()

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective ``(W_Q, W_K)``, each ``(H, d, d_head)``, with ``q_h = x @ W_Q[h]``."""
        d = self.q_proj.in_features
        # nn.Linear computes x @ weight.T; weight is (out=d, in=d), out split into heads
        w_q = self.q_proj.weight.T.reshape(d, self.n_head, self.d_head).permute(1, 0, 2)  # (nh, d, hs)
        w_k = self.k_proj.weight.T.reshape(d, self.n_head, self.d_head).permute(1, 0, 2)  # (nh, d, hs)
        return w_q, w_k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of ``q, k, v`` (each ``(B, nh, T, hs)``); the place to change logits."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, sequence length, width
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hs)
        k = self._split_heads(self.k_proj(x))  # (B, nh, T, hs)
        v = self._split_heads(self.v_proj(x))  # (B, nh, T, hs)
        if probe_active(self.probe):
            self.probe(x, q, k)
        y = self.attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.o_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """Position-wise ``d -> ratio*d -> d`` with GELU."""

    def __init__(self, d_model: int, ratio: int = 4):
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model, bias=False)
        self.proj = nn.Linear(ratio * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C)


class Block(nn.Module):
    """Residual attention + MLP with LayerNorm before (pre), after (post) or without (none)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = cfg.norm
        make_norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.norm != "none" else nn.Identity
        self.ln1 = make_norm()
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head)
        self.ln2 = make_norm()
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "post":
            x = self.ln1(x + self.attn(x))  # (B, T, C)
            return self.ln2(x + self.mlp(x))  # (B, T, C)
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class GPT(nn.Module):
    """Byte-level causal language model; ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # pre-LN leaves the residual stream unnormalised: normalise once before the head
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def attention_modules(self) -> list[CausalSelfAttention]:
        """The attention module of each block, in layer order."""
        return [block.attn for block in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"idx has length {T}, more than block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
        return logits, loss


def apply_reparam(model: nn.Module, reparam: str, *, gamma_init: str = "sigma") -> nn.Module:
    """Reparametrise every ``nn.Linear`` of ``model`` in place and return it.

    ``"none"`` leaves it alone; ``"sigma"`` applies sigmaReparam
    (:func:`sigma_core.reparam.convert_to_sigma_reparam`, W_hat = gamma/sigma(W) * W);
    ``"spectral"`` applies ``torch.nn.utils.parametrizations.spectral_norm`` (W_hat = W/sigma(W)).
    """
    if reparam == "none":
        return model
    if reparam == "sigma":
        from sigma_core.reparam import convert_to_sigma_reparam

        return convert_to_sigma_reparam(model, layer_types=(nn.Linear,), gamma_init=gamma_init)
    if reparam == "spectral":
        from torch.nn.utils.parametrizations import spectral_norm

        for module in list(model.modules()):
            if isinstance(module, nn.Linear):
                spectral_norm(module)
        return model
    raise ValueError(f"reparam must be 'none', 'sigma' or 'spectral', got {reparam!r}")


def build_model(cfg) -> GPT:
    """The :class:`GPT` of a :class:`~sigma_core.config.TrainConfig`, reparametrised as it says."""
    model = GPT(ModelConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, block_size=cfg.block_size, norm=cfg.norm,
                            mlp_ratio=cfg.mlp_ratio))
    return apply_reparam(model, cfg.reparam, gamma_init=cfg.gamma_init)
