"""An encoder-decoder Transformer (the machine-translation shape) with observable attention.

``n_layer`` encoder blocks (bidirectional self-attention + GELU MLP, the blocks of
:mod:`sigma_core.models.gpt`) and ``n_layer`` decoder blocks (causal self-attention, cross-
attention to the encoder output, MLP), with the normalisation after each residual addition
(``"post"``, the original Transformer and the paper's deep machine-translation models), before
it (``"pre"``) or nowhere (``"none"``).  Source and target share one embedding table of
``vocab_size`` symbols plus a begin-of-sequence token; the decoder is trained with teacher
forcing (input ``[BOS, y_1, ..., y_{L-1}]``, target ``y``).

Every attention module follows the probe protocol of :mod:`sigma_core.probe`.  A cross-attention
module's queries come from the decoder and its keys from the encoder: it shows the probe both
token matrices, ``probe(x, q, k, memory)``, so the bound's weight variants use
``||X_q|| ||X_k||`` (eq. (7) with separate query and key tokens).

Example
-------
>>> torch.manual_seed(0) and None
>>> model = Seq2Seq(Seq2SeqConfig(vocab_size=8, d_model=16, n_layer=2, n_head=2, block_size=6))
>>> src = torch.randint(0, 8, (3, 6))
>>> logits, loss = model(src, src.flip(1))
>>> tuple(logits.shape), len(model.attention_modules()), bool(loss > 0)
((3, 6, 8), 6, True)
>>> # causal decoder: changing the last target token leaves every prediction unchanged
>>> tgt = src.flip(1); tgt2 = tgt.clone(); tgt2[:, -1] = (tgt2[:, -1] + 1) % 8
>>> bool(torch.allclose(model(src, tgt2)[0], logits, atol=1e-6))
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.models.gpt import MLP, Block, CausalSelfAttention, ModelConfig
from sigma_core.probe import probe_active


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Shape of the :class:`Seq2Seq`: symbols, width, depth (per side), heads, length, norm placement."""

    vocab_size: int = 16
    d_model: int = 64
    n_layer: int = 6
    n_head: int = 4
    block_size: int = 12
    norm: str = "post"
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        # the shared checks (positive ints, divisibility, norm) live in ModelConfig
        ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layer=self.n_layer,
                    n_head=self.n_head, block_size=self.block_size, norm=self.norm,
                    mlp_ratio=self.mlp_ratio)


class CrossAttention(CausalSelfAttention):
    """Multi-head attention of decoder tokens ``x`` (queries) to encoder tokens ``memory`` (keys, values)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__(d_model, n_head)
        self.causal = False

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # noqa: D102
        B, T, C = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hs)
        k = self._split_heads(self.k_proj(memory))  # (B, nh, S, hs)
        v = self._split_heads(self.v_proj(memory))  # (B, nh, S, hs)
        if probe_active(self.probe):
            self.probe(x, q, k, memory)  # keys come from memory, not x
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention and MLP, each a residual branch, norm pre/post/none."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm = cfg.norm
        make_norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.norm != "none" else nn.Identity
        self.ln1 = make_norm()
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head)
        self.ln2 = make_norm()
        self.cross = CrossAttention(cfg.d_model, cfg.n_head)
        self.ln3 = make_norm()
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.norm == "post":
            x = self.ln1(x + self.attn(x))  # (B, T, C)
            x = self.ln2(x + self.cross(x, memory))  # (B, T, C)
            return self.ln3(x + self.mlp(x))  # (B, T, C)
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        x = x + self.cross(self.ln2(x), memory)  # (B, T, C)
        return x + self.mlp(self.ln3(x))  # (B, T, C)


class Seq2Seq(nn.Module):
    """``forward(src (B, L), tgt (B, L)) -> (logits (B, L, vocab_size), loss)`` with teacher forcing."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        if not isinstance(cfg, Seq2SeqConfig):
            raise TypeError(f"cfg must be a Seq2SeqConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.bos = cfg.vocab_size  # the extra token
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)
        self.src_pos = nn.Embedding(cfg.block_size, cfg.d_model)
        self.tgt_pos = nn.Embedding(cfg.block_size, cfg.d_model)
        enc_cfg = ModelConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, block_size=cfg.block_size, norm=cfg.norm,
                              mlp_ratio=cfg.mlp_ratio)
        self.encoder = nn.ModuleList(Block(enc_cfg) for _ in range(cfg.n_layer))
        for block in self.encoder:
            block.attn.causal = False
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        # pre-LN leaves both residual streams unnormalised: normalise each once at its end
        self.ln_enc = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.ln_dec = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(3 * cfg.n_layer))

    def attention_modules(self) -> list[CausalSelfAttention]:
        """Every attention module in the order a forward calls them: encoder, then per decoder
        block its self-attention and its cross-attention."""
        mods = [block.attn for block in self.encoder]
        for block in self.decoder:
            mods += [block.attn, block.cross]
        return mods

    def forward(self, src: torch.Tensor, tgt: torch.Tensor):
        cfg = self.cfg
        if src.ndim != 2 or tgt.shape != src.shape or src.shape[1] > cfg.block_size:
            raise ValueError(f"src and tgt must both be (B, L) with L <= block_size {cfg.block_size}, "
                             f"got {tuple(src.shape)} and {tuple(tgt.shape)}")
        B, L = src.shape
        pos = torch.arange(L, device=src.device)  # (L,)
        memory = self.tok_emb(src) + self.src_pos(pos)  # (B, L, C)
        for block in self.encoder:
            memory = block(memory)  # (B, L, C)
        memory = self.ln_enc(memory)
        dec_in = torch.cat([torch.full_like(tgt[:, :1], self.bos), tgt[:, :-1]], dim=1)  # (B, L)
        x = self.tok_emb(dec_in) + self.tgt_pos(pos)  # (B, L, C)
        for block in self.decoder:
            x = block(x, memory)  # (B, L, C)
        logits = self.head(self.ln_dec(x))  # (B, L, vocab)
        loss = F.cross_entropy(logits.float().reshape(B * L, -1), tgt.reshape(B * L))
        return logits, loss


def build_seq2seq(cfg) -> Seq2Seq:
    """The :class:`Seq2Seq` of a flat :class:`~sigma_core.experiments.config.TrainConfig` (not reparametrised)."""
    return Seq2Seq(Seq2SeqConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer,
                                 n_head=cfg.n_head, block_size=cfg.block_size, norm=cfg.norm,
                                 mlp_ratio=cfg.mlp_ratio))
