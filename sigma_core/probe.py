"""Where an attention module shows its queries and keys to observers.

The project's attention module (and any module that follows the same protocol) owns an
:class:`AttentionProbe` submodule named ``probe`` and calls ``self.probe(x, q, k)`` after it
has computed its queries and keys, but only when :func:`probe_active` says someone listens,
so an unobserved forward pays nothing.  Observers (the :class:`~sigma_core.monitor.EntropyMonitor`)
attach ordinary forward hooks to the probe; the hook receives ``args = (x, q, k)`` with

- ``x``: the attention input, shape ``(B, T, d)`` (after the block's normalisation, if any);
- ``q``, ``k``: shape ``(B, H, T, d_head)``, before the logit scale is applied;
- optionally a fourth argument ``x_k``, shape ``(B, S, d)``: the tokens the keys come from when
  they are not ``x`` (cross-attention; ``k`` is then ``(B, H, S, d_head)``).

Protocol of the owning attention module (attributes the observers read):

- ``probe``: the :class:`AttentionProbe`;
- ``n_head`` (int), ``scale`` (float, the logit scale, ``1/sqrt(d_head)`` by default),
  ``causal`` (bool);
- ``head_weights()`` -> ``(W_Q, W_K)``, each ``(H, d, d_head)`` in the theory convention
  ``q_h = x @ W_Q[h]`` (the *effective* weights, i.e. after any reparametrisation).  Observers
  call it under ``torch.no_grad()``, which never advances sigmaReparam's power iteration.

Extensions for modules whose logits are not ``scale * (x W_Q) (x W_K)^T`` (observers must honour
them; both default to the plain case when absent):

- ``weight_bounds_valid`` (bool, default True): False when ``q``, ``k`` are not ``x @ W_Q[h]``,
  ``x @ W_K[h]`` (QK-LayerNorm: the probe receives the normalised q, k).  The weight-based bound
  variants (theorem, per_query, centered) then do not apply; only ``exact`` is checked.
- transformed logits (soft-capping ``c tanh(a / c)``): the module passes factors ``q'``, ``k'``
  with ``scale * q' k'^T`` equal to the logits it actually uses (``q' = logits / scale``,
  ``k' = I_T``, so ``d_head`` reads as ``T``); entropies and exact norms are then those of the
  attention actually used.
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionProbe(nn.Module):
    """Identity point that exposes ``(x, q, k)`` to forward hooks; returns nothing."""

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                x_k: torch.Tensor | None = None) -> None:  # noqa: D102
        return None


def probe_active(probe: AttentionProbe) -> bool:
    """True when at least one forward hook listens on ``probe``."""
    return bool(probe._forward_hooks) or bool(probe._forward_pre_hooks)
