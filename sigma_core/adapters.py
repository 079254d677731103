"""Where the query and key projections of third-party attention modules live (a small registry).

The weight-based variants of the entropy bound (``theorem``, ``per_query``, ``centered``; eq. (7)
of theory/README.md) need the tokens ``x`` that enter an attention module and its per-head
projections ``W_Q[h], W_K[h]``: the logits must be ``scale * (x W_Q[h] + b_Q[h]) (x W_K[h] +
b_K[h])^T`` (plus a pure 0/-inf mask).  An *adapter* reads these from one kind of module, given
the arguments of its ``forward`` call, and returns :class:`Projections`, or the reason why the
weight bounds do not apply to that call:

- rotary position embeddings (Llama, x-transformers with ``rotary_pos_emb``): the logits are
  ``x_i W_Q R_{j-i} W_K^T x_j^T`` with a position-dependent rotation ``R``, which is not the
  bilinear form the theorem bounds;
- QK-normalisation: the logits are formed from normalised ``q, k``, not from ``x W``;
- cross-attention, relative-position scores and other extras not covered by an adapter.

Projection biases enter as augmented tokens ``[x, 1]`` and weights ``[W; b]`` (then the logits
are exactly ``[x_i,1] W~_Q W~_K^T [x_j,1]^T``).  Adapters are looked up by the class of the
module (its ``__module__`` and ``__qualname__``, along the MRO, so subclasses match too); the
monitor additionally checks, on the rows it samples for the bound, that the adapter's logits equal
the logits the model actually normalised, so an adapter that does not fit a model turns the
weight variants off (with the reason) instead of producing a wrong bound.

Register your own with :func:`register_adapter`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Projections", "register_adapter", "find_adapter", "ADAPTERS"]


@dataclass
class Projections:
    """Inputs of the weight-based bound for one attention call.

    ``x_q`` ``(B, Tq, d)``, ``x_k`` ``(B, Tk, d)`` (the same object for self-attention), ``w_q``
    ``(H, d, d_head)`` and ``w_k`` ``(H_kv, d, d_head)`` in the convention ``q_h = x @ W_Q[h]``
    (with a bias, ``d`` counts the appended constant input 1), and ``scale`` the logit scale.
    ``H_kv`` divides ``H`` (grouped-query attention: query head ``h`` uses key head
    ``h // (H / H_kv)``).
    """

    x_q: torch.Tensor
    x_k: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    scale: float


#: an adapter maps (module, args, kwargs) of the module's forward call to Projections or a reason
Adapter = Callable[[torch.nn.Module, tuple, dict], "Projections | str"]

#: registry: (module path, class qualname) -> adapter
ADAPTERS: dict[tuple[str, str], Adapter] = {}


def register_adapter(module_path: str, qualname: str, adapter: Adapter) -> None:
    """Register ``adapter`` for the class ``module_path.qualname`` (and its subclasses).

    ``adapter(module, args, kwargs)`` is called under ``torch.no_grad()`` with the arguments of the
    module's forward call and returns :class:`Projections` or a string saying why the weight
    bounds do not apply.
    """
    if not callable(adapter):
        raise TypeError(f"adapter must be callable, got {type(adapter).__name__}")
    ADAPTERS[(module_path, qualname)] = adapter


def find_adapter(module: torch.nn.Module) -> Adapter | None:
    """The adapter registered for ``type(module)`` or its nearest base class, else None."""
    for cls in type(module).__mro__:
        ad = ADAPTERS.get((cls.__module__, cls.__qualname__))
        if ad is not None:
            return ad
    return None


def _arg(module, args, kwargs, name):
    """The value of forward argument ``name`` (positional or keyword; None when absent)."""
    if name in kwargs:
        return kwargs[name]
    params = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
    if name in params:
        i = params.index(name)
        if i < len(args):
            return args[i]
    return None


def _heads(w: torch.Tensor, b: torch.Tensor | None, n_head: int) -> torch.Tensor:
    """``x @ w + b`` with ``w`` ``(d, n_head*dh)`` -> per-head ``(n_head, d(+1), dh)``."""
    d, hd = w.shape
    out = w.detach().reshape(d, n_head, hd // n_head).permute(1, 0, 2)
    if b is not None:
        out = torch.cat([out, b.detach().reshape(n_head, 1, hd // n_head)], 1)
    return out


def _with_ones(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1) if bias else x


def _linear_heads(lin, n_head):
    """Per-head weights of an ``nn.Linear`` (``weight`` (out, in)) and whether it has a bias."""
    return _heads(lin.weight.T, lin.bias, n_head), lin.bias is not None


# -- Hugging Face transformers -------------------------------------------------------------------
def _hf_common(kwargs) -> str | None:
    if kwargs.get("position_embeddings") is not None:
        return "rotary position embeddings: the logits are x_i W_Q R_(j-i) W_K^T x_j^T, not x W_Q W_K^T x^T"
    if kwargs.get("encoder_hidden_states") is not None:
        return "cross-attention is not covered by the adapter"
    return None


def _hf_gpt2(module, args, kwargs):
    x = _arg(module, args, kwargs, "hidden_states")
    if _arg(module, args, kwargs, "encoder_hidden_states") is not None:
        return "cross-attention is not covered by the adapter"
    d = module.embed_dim
    w, b = module.c_attn.weight, module.c_attn.bias  # Conv1D: x @ w + b, w (d, 3d)
    has_b = b is not None
    w_q = _heads(w[:, :d], b[:d] if has_b else None, module.num_heads)
    w_k = _heads(w[:, d:2 * d], b[d:2 * d] if has_b else None, module.num_heads)
    xa = _with_ones(x.detach(), has_b)
    return Projections(xa, xa, w_q, w_k, float(module.scaling))


def _hf_bert(module, args, kwargs):
    reason = _hf_common(kwargs)
    if reason:
        return reason
    if getattr(module, "position_embedding_type", "absolute") not in (None, "absolute"):
        return "relative position scores are added to the logits"
    x = _arg(module, args, kwargs, "hidden_states")
    H = module.num_attention_heads
    w_q, bq = _linear_heads(module.query, H)
    w_k, _ = _linear_heads(module.key, H)
    xa = _with_ones(x.detach(), bq)
    return Projections(xa, xa, w_q, w_k, float(module.scaling))


def _hf_rotary(module, args, kwargs):
    reason = _hf_common(kwargs)
    return reason or "rotary position embeddings: the logits are x_i W_Q R_(j-i) W_K^T x_j^T"


register_adapter("transformers.models.gpt2.modeling_gpt2", "GPT2Attention", _hf_gpt2)
register_adapter("transformers.models.bert.modeling_bert", "BertSelfAttention", _hf_bert)
register_adapter("transformers.models.llama.modeling_llama", "LlamaAttention", _hf_rotary)


# -- x-transformers ------------------------------------------------------------------------------
def _xt_attention(module, args, kwargs):
    if getattr(module, "qk_norm", False):
        return "QK-normalisation: the logits are formed from normalised q, k, not from x W"
    if _arg(module, args, kwargs, "rotary_pos_emb") is not None:
        return "rotary position embeddings: the logits are x_i W_Q R_(j-i) W_K^T x_j^T"
    if _arg(module, args, kwargs, "context") is not None:
        return "cross-attention is not covered by the adapter"
    x = _arg(module, args, kwargs, "x")
    if x is None or not hasattr(module, "to_q") or not hasattr(module, "to_k"):
        return "this x-transformers attention layout is not covered by the adapter"
    w_q, _ = _linear_heads(module.to_q, module.heads)
    w_k, _ = _linear_heads(module.to_k, module.kv_heads)
    xd = x.detach()
    return Projections(xd, xd, w_q, w_k, float(module.scale))


register_adapter("x_transformers.x_transformers", "Attention", _xt_attention)
