"""A minimal GPT: byte-level causal Transformer with observable attention.

Token and learned position embeddings, ``n_layer`` blocks (attention + GELU MLP x4) with the
normalisation placed before (``"pre"``), after (``"post"``) or nowhere (``"none"``), and a linear
head.  Two attention stabilisers, combinable with each other and with every placement:
QK-LayerNorm (``qk_norm``: a LayerNorm over ``d_head``, shared by the heads, applied to q and k
before the logits; Dehghani et al. 2023, Wortsman et al. 2023) and logit soft-capping
(``logit_softcap`` = c > 0: logits ``a -> c tanh(a / c)``, as in Gemma 2).  Attention has separate q/k/v/o projections, so a weight reparametrisation (sigmaReparam,
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

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

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
    qk_norm: bool = False
    logit_softcap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "block_size", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.norm not in ("pre", "post", "none"):
            raise ValueError(f"norm must be 'pre', 'post' or 'none', got {self.norm!r}")
        if not isinstance(self.qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {type(self.qk_norm).__name__}")
        if not (isinstance(self.logit_softcap, (int, float)) and 0 <= self.logit_softcap < math.inf):
            raise ValueError(f"logit_softcap must be a finite number >= 0 (0: off), got {self.logit_softcap!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (no biases).

    Logits of head h: ``a = scale * (x W_Q[h]) (x W_K[h])^T`` with ``scale = 1/sqrt(d_head)``,
    masked causally, so row i sees its T_i = i + 1 keys (theory/README.md, notation).

    ``qk_norm``: q and k pass through ``nn.LayerNorm(d_head)`` (one per side, shared by the heads)
    before the logits, so the logits are no longer ``x W_Q W_K^T x^T``: the probe then receives
    the *normalised* q, k and ``weight_bounds_valid`` is False (observers check only the exact
    variant of the bound; ``head_weights()`` still returns the projections, whose sigma_h is then
    a statistic, not a bound).  ``logit_softcap`` = c > 0: ``a -> c tanh(a / c)`` on an explicit
    attention path (SDPA cannot cap); the probe receives factors ``q' = a_capped / scale`` and
    ``k' = I_T`` with ``scale * q' k'^T`` = the capped logits (:mod:`sigma_core.probe`).  Since
    ``c tanh(./c)`` is 1-Lipschitz it shrinks every pairwise logit difference, hence every centred
    row norm, so the weight-based bounds of the raw logits stay valid for the capped ones.
    """

    def __init__(self, d_model: int, n_head: int, *, qk_norm: bool = False, logit_softcap: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if not logit_softcap >= 0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), got {logit_softcap!r}")
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.causal = True
        self.logit_softcap = float(logit_softcap)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = nn.LayerNorm(self.d_head) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.d_head) if qk_norm else None
        #: probe protocol: False when the logits are not x W_Q W_K^T x^T (QK-LayerNorm)
        self.weight_bounds_valid = not qk_norm
        self.probe = AttentionProbe()

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective ``(W_Q, W_K)``, each ``(H, d, d_head)``, with ``q_h = x @ W_Q[h]`` (before any QK-norm).

        A parametrisation (sigmaReparam, spectral norm) is evaluated in eval mode, so reading the
        weights never advances a power iteration.
        """
        d = self.q_proj.in_features
        # nn.Linear computes x @ weight.T; weight is (out=d, in=d), out split into heads
        w_q, w_k = (_eval_weight(p).T.reshape(d, self.n_head, self.d_head).permute(1, 0, 2)
                    for p in (self.q_proj, self.k_proj))  # (nh, d, hs) each
        return w_q, w_k

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention logits ``scale q k^T``, soft-capped when ``logit_softcap`` > 0, unmasked ``(B, nh, T, T)``."""
        att = (q @ k.transpose(-1, -2)) * self.scale  # (B, nh, T, T)
        if self.logit_softcap > 0:
            att = self.logit_softcap * torch.tanh(att / self.logit_softcap)
        return att

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of ``q, k, v`` (each ``(B, nh, T, hs)``); the place to change logits."""
        if self.logit_softcap <= 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        T = q.shape[2]
        att = self.logits(q, k).float()  # (B, nh, T, T)
        if self.causal:
            hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T)
            att = att.masked_fill(hidden, -math.inf)
        return torch.softmax(att, dim=-1).to(v.dtype) @ v  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, sequence length, width
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hs)
        k = self._split_heads(self.k_proj(x))  # (B, nh, T, hs)
        v = self._split_heads(self.v_proj(x))  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, nh, T, hs), normalised over hs
        if probe_active(self.probe):
            if self.logit_softcap > 0:  # factors of the capped logits: scale * q' k'^T = c tanh(a / c)
                q_obs = self.logits(q, k) / self.scale  # (B, nh, T, T)
                k_obs = torch.eye(T, dtype=q_obs.dtype, device=x.device).expand(B, self.n_head, T, T)
                self.probe(x, q_obs, k_obs)
            else:
                self.probe(x, q, k)
        y = self.attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.o_proj(y)  # (B, T, C)


def _eval_weight(linear: nn.Linear) -> torch.Tensor:
    """``linear.weight``, with any parametrisation evaluated in eval mode (no power-iteration step)."""
    if not parametrize.is_parametrized(linear, "weight"):
        return linear.weight
    plist = linear.parametrizations.weight
    modes = [m.training for m in plist.modules()]
    plist.eval()
    try:
        return linear.weight
    finally:
        for m, mode in zip(plist.modules(), modes):
            m.training = mode


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
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, qk_norm=cfg.qk_norm,
                                        logit_softcap=cfg.logit_softcap)
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


def apply_reparam(model: nn.Module, reparam: str, *, gamma_init: str = "sigma",
                  layer_types=(nn.Linear,)) -> nn.Module:
    """Reparametrise every layer of ``model`` of one of ``layer_types`` (default every
    ``nn.Linear``; the ViT adds its patch-embedding ``nn.Conv2d``) in place and return it.

    ``"none"`` leaves it alone; ``"sigma"`` applies sigmaReparam
    (:func:`sigma_core.reparam.convert_to_sigma_reparam`, W_hat = gamma/sigma(W) * W);
    ``"spectral"`` applies ``torch.nn.utils.parametrizations.spectral_norm`` (W_hat = W/sigma(W)).
    ``layer_types`` is a module class, a tuple of them, or ``"Conv1D"`` (Hugging Face's GPT-2
    layer, matched by name), for both reparametrisations; anything else is a ``TypeError``
    naming it.

    >>> net = apply_reparam(nn.Sequential(nn.Linear(3, 4), nn.Conv1d(4, 4, 1)), "spectral",
    ...                     layer_types=nn.Linear)
    >>> [hasattr(m, "parametrizations") for m in net]  # the Linear layer only
    [True, False]
    """
    if not isinstance(reparam, str):
        raise TypeError(f"reparam must be 'none', 'sigma' or 'spectral' (a str), got {type(reparam).__name__}")
    if reparam not in ("none", "sigma", "spectral"):
        raise ValueError(f"reparam must be 'none', 'sigma' or 'spectral', got {reparam!r}")
    given = layer_types
    if isinstance(layer_types, (type, str)):  # one class (or "Conv1D") on its own
        layer_types = (layer_types,)
    try:
        layer_types = tuple(layer_types)
    except TypeError:
        layer_types = ()
    if not layer_types or not all(isinstance(t, type) or t == "Conv1D" for t in layer_types):
        raise TypeError(f'layer_types must be a module class, a tuple of them or "Conv1D", got {given!r}')
    if reparam == "none":
        return model
    if reparam == "sigma":
        from sigma_core.reparam import batch_power_iterations, convert_to_sigma_reparam

        # power-iteration steps batched per weight shape (same values; benchmarks/bench_reparam.py)
        return batch_power_iterations(convert_to_sigma_reparam(model, layer_types=layer_types,
                                                               gamma_init=gamma_init))
    from torch.nn.utils.parametrizations import spectral_norm

    from sigma_core.reparam import _matches_type

    for module in list(model.modules()):
        if _matches_type(module, layer_types):
            spectral_norm(module)
    return model


def build_model(cfg) -> GPT:
    """The :class:`GPT` of a :class:`~sigma_core.experiments.config.TrainConfig`, reparametrised as it says."""
    if getattr(cfg, "model", "gpt") != "gpt":
        raise ValueError(f"cfg.model must be 'gpt' here, got {cfg.model!r} "
                         "(sigma_core.experiments.train.build_model builds every model)")
    # TrainConfig is flat: it carries every ModelConfig field under the same name
    shape = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    model = GPT(ModelConfig(**shape))
    return apply_reparam(model, cfg.reparam, gamma_init=cfg.gamma_init)
