r"""σReparam: a spectrally reparametrised weight :math:`\hat W = (\gamma / \sigma(W))\, W`.

Zhai et al. (ICML 2023) replace every linear weight by :math:`\hat W = (\gamma/\sigma(W))W`
(theory/README.md, "σReparam"), where :math:`\sigma(W)` is the spectral norm of ``W``
estimated by power iteration and :math:`\gamma` a learnable scalar.  Then
:math:`\lVert\hat W_K\hat W_Q^\top\rVert_2 \le \gamma_K\gamma_Q`, so two scalars control the
logit norm in the entropy bound, eq. (1).

The API follows :func:`torch.nn.utils.parametrizations.spectral_norm`: :func:`sigma_reparam`
registers a :mod:`torch.nn.utils.parametrize` parametrization on a module's weight, so
``module.weight`` *is* :math:`\hat W`, the raw weight lives in
``module.parametrizations.weight.original`` and :math:`\gamma` in
``module.parametrizations.weight[0].gamma``.

Power-iteration contract (project-wide; the entropy monitor relies on it)
-----------------------------------------------------------------------
The singular-vector estimates (buffers ``_u``, ``_v``) start from an exact SVD of the weight at
registration and advance by exactly one power-iteration step in each forward in which the
parametrization is in training mode **and** :func:`torch.is_grad_enabled` is true.  Reading the
weight under :func:`torch.no_grad` or in eval mode never changes a buffer.  (This differs
slightly from ``spectral_norm``, which updates whenever the module is in training mode, even
under ``no_grad``.)  Every training read of ``module.weight`` is a forward: a model that reads a
weight twice per step should do so inside :func:`torch.nn.utils.parametrize.cached` (one
computation of :math:`\hat W`, one step).  The step runs without gradient and in at least fp32, with autocast
disabled; :math:`\sigma = v^\top W u` is then computed *with* gradient through ``W``, so

.. math::  \frac{\partial L}{\partial W} = \frac{\gamma}{\sigma}
           \Big(G - \frac{\langle G, W\rangle}{\sigma}\, v u^\top\Big),
           \qquad G = \frac{\partial L}{\partial \hat W},

and :math:`\langle \partial L/\partial W, W\rangle = 0` (rescaling ``W`` leaves
:math:`\hat W` unchanged).  Convention: ``v`` is the left (output-side) and ``u`` the right
(input-side) singular vector.

A training forward whose σ estimate is not finite (the weight holds inf or NaN) raises
``FloatingPointError`` naming the weight: at once on the CPU, one training forward later on an
accelerator (the flag is copied to the host without a synchronisation, which would stall every
layer of every step).  Eval-mode and ``no_grad`` forwards do not check.

Batching: :func:`batch_power_iterations` (used by the project's training) takes the steps of
all equal-shaped weights of a model as one batched operation at the start of each training
forward of the model, with the same values; each weight's first read in that forward uses
that step instead of taking its own.  For 2-D weights in fp32/fp64 outside autocast the hook
also computes the group's :math:`\hat W` at once, in one autograd node whose backward gives
every weight's closed-form gradient in a few batched operations.

Shapes: a ``Linear`` weight is used as is; a ``Conv1d``/``Conv2d`` weight is flattened to an
``(out_channels, -1)`` matrix; ``nn.MultiheadAttention.in_proj_weight`` is split into its
q, k and v chunks, each with its own :math:`\sigma` and :math:`\gamma` (``gamma`` then has
shape ``(3,)``).

Example
-------
>>> import torch
>>> from torch import nn
>>> layer = sigma_reparam(nn.Linear(8, 4))
>>> W = layer.parametrizations.weight.original
>>> bool(torch.allclose(layer.weight, W))           # gamma_init="sigma": unchanged at init
True
>>> state = sigma_reparam_state(layer)["weight"]
>>> abs(state["sigma"] - torch.linalg.matrix_norm(W, 2).item()) < 1e-5
True
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "SigmaReparam",
    "SigmaReparamLinear",
    "batch_power_iterations",
    "convert_to_sigma_reparam",
    "fold_sigma_reparam",
    "is_sigma_reparametrized",
    "sigma_reparam",
    "sigma_reparam_state",
]

#: names given to the chunks of ``nn.MultiheadAttention.in_proj_weight``
QKV_CHUNKS = ("q", "k", "v")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class SigmaReparam(nn.Module):
    r"""The parametrization :math:`W \mapsto (\gamma/\sigma(W))\,W` (theory/README.md, σReparam).

    Usually created by :func:`sigma_reparam`, not directly.

    Parameters
    ----------
    weight : torch.Tensor
        The weight at registration; its SVD gives the initial singular vectors.
    n_chunks : int
        The weight is viewed as ``n_chunks`` stacked blocks of rows, each reparametrised on
        its own (3 for a fused q/k/v projection, else 1).
    gamma_init : {"sigma", "one"} or float
        ``"sigma"``: :math:`\gamma = \sigma(W_0)`, so :math:`\hat W = W_0` at init (official
        PyTorch code; the default).  ``"one"``: :math:`\gamma = 1` (paper text, official JAX
        code).  A float sets :math:`\gamma` directly.
    n_power_iterations : int
        Power-iteration steps per training forward (>= 1).
    eps : float
        Floor of :math:`\sigma` and of the norms in the power iteration.
    label : str
        Name of the weight, used in error messages.

    Attributes
    ----------
    gamma : nn.Parameter
        Shape ``()``, or ``(n_chunks,)`` when ``n_chunks > 1``.
    _u, _v : torch.Tensor
        Buffers ``(n_chunks, in)`` and ``(n_chunks, out)``: right and left singular vectors.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        n_chunks: int = 1,
        gamma_init: str | float = "sigma",
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        label: str = "weight",
    ) -> None:
        super().__init__()
        if not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        if weight.ndim < 2:
            raise ValueError(f"{label}: sigma_reparam needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
        if weight.shape[0] % n_chunks:
            raise ValueError(f"{label}: {weight.shape[0]} rows do not split into {n_chunks} chunks")
        self.n_chunks = n_chunks
        self.n_power_iterations = n_power_iterations
        self.eps = float(eps)
        self.label = label
        with torch.no_grad():
            W = self._as_matrices(weight.detach()).to(_compute_dtype(weight.dtype))  # (c, m, n)
            if not torch.isfinite(W).all():
                raise ValueError(f"{label}: cannot register sigma_reparam on a non-finite weight")
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (c,m,k) (c,k) (c,k,n)
            sigma0 = S[:, 0]  # (c,)
            if gamma_init == "sigma":
                gamma = sigma0.clamp_min(self.eps)
            elif gamma_init == "one":
                gamma = torch.ones_like(sigma0)
            elif isinstance(gamma_init, (int, float)) and not isinstance(gamma_init, bool):
                if not math.isfinite(gamma_init):
                    raise ValueError(f"gamma_init must be finite, got {gamma_init!r}")
                gamma = torch.full_like(sigma0, float(gamma_init))
            else:
                raise ValueError(f'gamma_init must be "sigma", "one" or a float, got {gamma_init!r}')
        self.register_buffer("_u", Vh[:, 0, :].contiguous())  # (c, n) right singular vectors
        self.register_buffer("_v", U[:, :, 0].contiguous())  # (c, m) left singular vectors
        gamma = gamma.to(weight.dtype if weight.dtype.is_floating_point else torch.float32)
        self.gamma = nn.Parameter(gamma if n_chunks > 1 else gamma.reshape(()))
        #: fresh ``(u, v, sigma)`` of this forward's step, set by a batched step
        #: (:func:`batch_power_iterations`) and consumed by the next training forward
        #: and, when the group's W_hat was computed at once (:class:`_GroupScaleBySigma`), this
        #: weight's W_hat and the raw weight it was computed from (else None, None)
        self._batched_step: tuple | None = None
        #: set by the owning module's hooks (:func:`_cache_weights_per_forward`): only the first
        #: training read of a forward steps; ``_stepped`` says whether it has happened
        self._once_per_forward = False
        self._stepped = False

    def _as_matrices(self, W: torch.Tensor) -> torch.Tensor:
        """``(c, rows/c, -1)`` view of the weight (conv kernels flattened per output channel)."""
        return W.reshape(self.n_chunks, W.shape[0] // self.n_chunks, -1)

    @torch.no_grad()
    def _power_iteration(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance ``_u``, ``_v`` by ``n_power_iterations`` steps; W is (c, m, n).

        Returns fresh ``(u, v, sigma)`` with sigma = |Wᵀv| = vᵀ W u (the new vectors), shape (c,).
        """
        u, v, sigma = _power_steps(W, _cast(self._u, W.dtype), _cast(self._v, W.dtype),
                                   self.n_power_iterations, self.eps)
        self._u.copy_(u)
        self._v.copy_(v)
        return u, v, sigma

    #: devices on which the finiteness check reads its result at once (a cheap host read);
    #: elsewhere it is read one training forward later, so the check never stalls the device
    SYNC_CHECK_DEVICES = ("cpu",)

    def _check_finite(self, sigma: torch.Tensor) -> None:
        """Raise FloatingPointError when the sigma estimate is not finite (training only)."""
        if sigma.device.type in self.SYNC_CHECK_DEVICES:
            bad = not math.isfinite(float(sigma if sigma.numel() == 1 else sigma.sum()))
        else:  # the flag of the previous forward, copied without synchronising
            flag = getattr(self, "_nonfinite_flag", None)
            bad = flag is not None and bool(flag)
            if flag is None:
                pin = sigma.device.type == "cuda"
                flag = self._nonfinite_flag = torch.zeros((), dtype=torch.bool, pin_memory=pin)
            if not bad:
                flag.copy_(~torch.isfinite(sigma).all(), non_blocking=True)
        if bad:
            raise _nonfinite_error(self.label)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma = v^\top W u` per chunk, shape ``(c,)``, with gradient through ``weight``.

        Uses the current vectors as they are (never advances them); not clamped.
        """
        W = self._as_matrices(weight).to(_compute_dtype(weight.dtype))
        return _vWu(self._v.to(W.dtype), W, self._u.to(W.dtype))  # (c,)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # autocast off for the whole computation; entering the context manager costs more than
        # the rest of a small layer's reparametrisation, so only when autocast is on
        if _compiling() or torch.is_autocast_enabled(weight.device.type):
            with torch.autocast(weight.device.type, enabled=False):
                return self._reparametrize(weight)
        return self._reparametrize(weight)

    def _reparametrize(self, weight: torch.Tensor) -> torch.Tensor:
        W = _cast(self._as_matrices(weight), _compute_dtype(weight.dtype))  # (c, m, n)
        if self.training and torch.is_grad_enabled() and not (self._once_per_forward and self._stepped):
            self._stepped = self._once_per_forward
            pending = self._batched_step
            if pending is not None:  # this forward's step already taken by the batched step
                self._batched_step = None
                u, v, sigma, W_hat, source = pending
                if W_hat is not None and weight is source:  # W_hat computed with its group
                    return W_hat
            else:
                # fresh u, v (not the buffers, which the next forward overwrites) for backward
                u, v, sigma = self._power_iteration(W.detach())
                if not _compiling():
                    self._check_finite(sigma)
        else:
            u, v = _cast(self._u, W.dtype), _cast(self._v, W.dtype)
            if torch.is_grad_enabled():
                u, v = u.clone(), v.clone()
            with torch.no_grad():
                sigma = _vWu(v, W, u)
        gamma = _cast(self.gamma, W.dtype).reshape(self.n_chunks)
        out = _ScaleBySigma.apply(W, gamma, u, v, sigma, self.eps)  # (c, m, n)
        return _cast(out.reshape(weight.shape), weight.dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when it would be a no-op (a dispatch per small op counts)."""
    return t if t.dtype == dtype else t.to(dtype)


def _power_steps(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_steps: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_steps`` power-iteration steps on a batch of matrices W (c, m, n) from u (c, n), v (c, m).

    Returns ``(u, v, sigma)``, sigma = |Wᵀv| = vᵀ W u per matrix, shape (c,).  The same
    function serves one weight (c = its chunks) and a batch of equal-shaped weights.
    """
    sigma = None
    for _ in range(n_steps):
        v, _ = _normalize_or_keep(torch.matmul(W, u.unsqueeze(-1)).squeeze(-1), v, eps)
        u, sigma = _normalize_or_keep(torch.matmul(v.unsqueeze(-2), W).squeeze(-2), u, eps)
    return u, v, sigma


def _vWu(v: torch.Tensor, W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """vᵀ W u per chunk: v (c, m), W (c, m, n), u (c, n) -> (c,)."""
    return (v.unsqueeze(-2) @ W @ u.unsqueeze(-1)).reshape(W.shape[0])


class _ScaleBySigma(torch.autograd.Function):
    r""":math:`\hat W = (\gamma/\sigma) W` with :math:`\sigma = v^\top W u` and the closed-form backward

    :math:`\partial L/\partial W = (\gamma/\sigma)(G - (\langle G, W\rangle/\sigma)\, v u^\top)`,
    :math:`\partial L/\partial\gamma = \langle G, W\rangle/\sigma` (theory/README.md, σReparam):
    the gradient autograd would give for ``gamma / clamp(v^T W u, eps) * W``, in three passes
    over the matrix instead of about ten small operations.  ``sigma`` is passed in (its value,
    vᵀWu, is known from the power iteration); where it is below ``eps`` it is clamped and the
    second term vanishes.  Double backward recomputes σ from W, so it is exact too.
    """

    @staticmethod
    def forward(ctx, W, gamma, u, v, sigma, eps):  # noqa: D102
        scale = gamma / sigma.clamp_min(eps)  # (c,)
        ctx.save_for_backward(W, gamma, u, v, sigma)
        ctx.eps = eps
        return W * scale.view(-1, 1, 1)

    @staticmethod
    def backward(ctx, G):  # noqa: D102
        W, gamma, u, v, sigma = ctx.saved_tensors
        eps = ctx.eps
        with torch.autocast(G.device.type, enabled=False):
            if torch.is_grad_enabled():  # create_graph: sigma as a differentiable function of W
                sigma = _vWu(v, W, u)
            sig = sigma.clamp_min(eps)
            scale = gamma / sig  # (c,)
            c = W.shape[0]
            if c == 1:
                gw = torch.dot(G.reshape(-1), W.reshape(-1)).reshape(1)  # <G, W>
            else:
                gw = (G * W).sum((-2, -1))  # (c,)
            grad_gamma = gw / sig if ctx.needs_input_grad[1] else None
            grad_W = None
            if ctx.needs_input_grad[0]:
                coef = torch.where(sigma > eps, scale * gw / sig, torch.zeros_like(gw))  # (c,)
                # (one pass less than an out-of-place baddbmm; G * scale is a fresh tensor)
                grad_W = (G * scale.view(-1, 1, 1)).baddbmm_((v * -coef.unsqueeze(-1)).unsqueeze(-1),
                                                             u.unsqueeze(-2))
        return grad_W, grad_gamma, None, None, None, None


class _GroupScaleBySigma(torch.autograd.Function):
    r""":class:`_ScaleBySigma` for a group of weights whose matrices share one shape, in one node.

    ``apply(eps, sizes, k, W_1..W_k, gamma_1..gamma_k, u, v, sigma)``: ``W_i`` is a 2-D weight of
    ``sizes[i]`` chunks, ``u`` (N, n), ``v`` (N, m), ``sigma`` (N,) the fresh step of the group's
    N = sum(sizes) chunk matrices.  Returns the k matrices :math:`\hat W_i = (\gamma/\sigma) W_i`; the
    backward gives every :math:`\partial L/\partial W_i` and :math:`\partial L/\partial\gamma_i`
    of the closed form (the values :class:`_ScaleBySigma` gives one by one) in a few batched
    operations instead of a node with about ten operations per weight.
    """

    @staticmethod
    def forward(ctx, eps, sizes, k, *args):  # noqa: D102
        Ws, gammas, (u, v, sigma) = args[:k], args[k:2 * k], args[2 * k:]
        gamma = torch.cat([g.reshape(-1) for g in gammas])  # (N,)
        scale = gamma / sigma.clamp_min(eps)  # (N,)
        rows = [s.view(1, 1) if c == 1 else s.repeat_interleave(W.shape[0] // c).unsqueeze(-1)
                for s, c, W in zip(scale.split(sizes), sizes, Ws)]
        ctx.save_for_backward(gamma, u, v, sigma, *Ws, *gammas)
        ctx.eps, ctx.sizes, ctx.k = eps, sizes, k
        return tuple(torch._foreach_mul(list(Ws), rows))

    @staticmethod
    def backward(ctx, *Gs):  # noqa: D102
        eps, sizes, k = ctx.eps, ctx.sizes, ctx.k
        gamma, u, v, sigma, *rest = ctx.saved_tensors
        Ws, gammas = rest[:k], rest[k:]
        need = ctx.needs_input_grad
        gammas_in = need[3 + k:3 + 2 * k]
        if torch.is_grad_enabled():  # create_graph: weight by weight, differentiably
            gW, gg = [], []
            for W, G, ui, vi, gi, c in zip(Ws, Gs, u.split(sizes), v.split(sizes), gammas, sizes):
                gi = gi.reshape(c)  # the input itself (the saved cat has no graph)
                W3, G3 = W.reshape(c, -1, W.shape[1]), G.reshape(c, -1, W.shape[1])
                si = _vWu(vi, W3, ui)
                sig = si.clamp_min(eps)
                gw = (G3 * W3).sum((-2, -1))
                coef = torch.where(si > eps, gi / sig * gw / sig, torch.zeros_like(gw))
                gW.append((G3 * (gi / sig).view(-1, 1, 1)
                           - (vi * coef.unsqueeze(-1)).unsqueeze(-1) * ui.unsqueeze(-2)).reshape(W.shape))
                gg.append((gw / sig).reshape(()) if c == 1 else gw / sig)
            return (None, None, None, *gW, *(g if n else None for g, n in zip(gg, gammas_in)),
                    None, None, None)
        with torch.autocast(Gs[0].device.type, enabled=False):
            gw = torch.cat([torch.dot(G.reshape(-1), W.reshape(-1)).reshape(1) if c == 1
                            else (G.reshape(c, -1) * W.reshape(c, -1)).sum(-1)
                            for G, W, c in zip(Gs, Ws, sizes)])  # (N,) <G, W> per chunk
            sig = sigma.clamp_min(eps)
            scale = gamma / sig
            grad_gamma = (gw / sig).split(sizes)
            coef = torch.where(sigma > eps, scale * gw / sig, torch.zeros_like(gw))
            rank1 = torch.bmm((v * -coef.unsqueeze(-1)).unsqueeze(-1), u.unsqueeze(-2))  # (N, m, n)
            rank1 = [r.reshape(W.shape) for r, W in zip(rank1.split(sizes), Ws)]
            rows = [s.view(1, 1) if c == 1 else s.repeat_interleave(W.shape[0] // c).unsqueeze(-1)
                    for s, c, W in zip(scale.split(sizes), sizes, Ws)]
            grad_W = torch._foreach_addcmul(rank1, list(Gs), rows)  # scale G - coef v u^T
        grad_gammas = [(g.reshape(()) if c == 1 else g) if n else None
                       for g, c, n in zip(grad_gamma, sizes, gammas_in)]
        grad_W = [g if n else None for g, n in zip(grad_W, need[3:3 + k])]
        return (None, None, None, *grad_W, *grad_gammas, None, None, None)


def _normalize_or_keep(x: torch.Tensor, old: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` normalised and their norms; a row with norm <= eps keeps ``old`` (no NaN
    for a zero weight)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (c, 1)
    return torch.where(norm > eps, x / norm.clamp_min(eps), old), norm.squeeze(-1)


def _find(module: nn.Module, name: str) -> SigmaReparam | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, SigmaReparam):
            return p
    return None


def is_sigma_reparametrized(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` carries a σReparam parametrization.

    >>> is_sigma_reparametrized(sigma_reparam(nn.Linear(2, 2))), is_sigma_reparametrized(nn.Linear(2, 2))
    (True, False)
    """
    return _find(module, name) is not None


def sigma_reparam(
    module: nn.Module,
    name: str = "weight",
    *,
    gamma_init: str | float = "sigma",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> nn.Module:
    r"""Register σReparam :math:`\hat W = (\gamma/\sigma(W))W` on ``module.<name>``; return the module.

    See the module docstring for the power-iteration contract and the gradient.  For
    ``nn.MultiheadAttention`` the default ``name="weight"`` means ``in_proj_weight`` (split into
    q/k/v chunks) or, with separate q/k/v dimensions, each of ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight``.  Its ``out_proj`` is an ordinary ``Linear``.

    Parameters
    ----------
    module : nn.Module
        Holds the weight (``Linear``, ``Conv1d``, ``Conv2d``, ``MultiheadAttention``, ...).
    name : str
        Name of the weight parameter.
    gamma_init : {"sigma", "one"} or float
        Initial :math:`\gamma`: :math:`\sigma(W_0)` (default, model unchanged at init), 1, or a value.
    n_power_iterations : int
        Power-iteration steps per training forward.
    eps : float
        :math:`\sigma` is clamped to at least ``eps``.

    Returns
    -------
    nn.Module
        ``module`` itself, with ``module.<name>`` now the reparametrised weight.

    Examples
    --------
    >>> conv = sigma_reparam(nn.Conv2d(3, 4, 3), gamma_init="one")
    >>> W = conv.weight.reshape(4, -1)
    >>> abs(torch.linalg.matrix_norm(W, 2).item() - 1.0) < 1e-5    # gamma = 1: unit spectral norm
    True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    opts = dict(gamma_init=gamma_init, n_power_iterations=n_power_iterations, eps=eps)
    if isinstance(module, nn.MultiheadAttention) and name == "weight":
        if module.in_proj_weight is not None:
            return sigma_reparam(module, "in_proj_weight", **opts)
        for sub in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            sigma_reparam(module, sub, **opts)
        return module
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"name: module {type(module).__name__} has no tensor {name!r}")
    if _find(module, name) is not None:
        raise ValueError(f"name: {name!r} of {type(module).__name__} already has sigma_reparam")
    n_chunks = 3 if isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight" else 1
    param = SigmaReparam(weight, n_chunks=n_chunks, label=name, **opts)
    param.to(weight.device)
    # unsafe=True: no consistency call of forward at registration (it would be a no-op anyway,
    # but this keeps the SVD vectors exactly as computed)
    parametrize.register_parametrization(module, name, param, unsafe=True)
    if isinstance(module, nn.MultiheadAttention):
        _cache_weights_per_forward(module)
    return module


def _enter_weight_cache(module: nn.Module, args) -> None:
    """Forward pre-hook: this forward of ``module`` advances each of its σReparam weights once."""
    for param in _own_sigma_params(module):
        param._once_per_forward, param._stepped = True, False


def _exit_weight_cache(module: nn.Module, args, output) -> None:
    """Forward hook (always called, also when the forward raises): back to a step per training read."""
    for param in _own_sigma_params(module):
        param._once_per_forward, param._stepped = False, False


def _own_sigma_params(module: nn.Module):
    plists = module.__dict__.get("_modules", {}).get("parametrizations")
    if plists is None:
        return
    for plist in plists.values():
        for param in plist:
            if isinstance(param, SigmaReparam):
                yield param


def _cache_weights_per_forward(module: nn.Module) -> None:
    """Make each training forward of ``module`` advance its σReparam weights exactly once.

    ``nn.MultiheadAttention`` reads ``in_proj_weight`` several times per forward (its fast-path
    checks, then the computation); without this every read would be a training read that
    advances the power iteration.  Later reads in the same forward reuse the vectors of the
    first (the same W_hat, each read with its own graph).  Reads under ``no_grad`` (an entropy
    monitor) neither step nor count, unlike a ``parametrize.cached()`` read, which would hand
    the forward a weight without gradient.
    """
    if _enter_weight_cache in module._forward_pre_hooks.values():
        return
    module.register_forward_pre_hook(_enter_weight_cache)
    module.register_forward_hook(_exit_weight_cache, always_call=True)


def _remove_weight_cache_hooks(module: nn.Module) -> None:
    for hooks, fn in ((module._forward_pre_hooks, _enter_weight_cache),
                      (module._forward_hooks, _exit_weight_cache)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            getattr(module, "_forward_hooks_always_called", {}).pop(key, None)


class SigmaReparamLinear(nn.Linear):
    r"""``nn.Linear`` whose weight is σReparam'd: ``y = x (γ/σ(W) W)ᵀ + b``.

    ``opts`` go to :func:`sigma_reparam`.

    >>> layer = SigmaReparamLinear(6, 3, gamma_init=2.0)
    >>> abs(torch.linalg.matrix_norm(layer.weight, 2).item() - 2.0) < 1e-5
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, **opts) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        sigma_reparam(self, "weight", **opts)


def _excluded(exclude, qualname: str, module: nn.Module) -> bool:
    if callable(exclude):
        return bool(exclude(qualname, module))
    return any(fnmatch.fnmatchcase(qualname, pattern) for pattern in exclude)


def convert_to_sigma_reparam(
    model: nn.Module,
    *,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    exclude: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    **opts,
) -> nn.Module:
    """Register σReparam on every layer of ``model`` of one of ``layer_types``, in place.

    Weights are kept (with the default ``gamma_init="sigma"`` the outputs do not change).

    Parameters
    ----------
    model : nn.Module
        Converted in place (layers already carrying σReparam are left alone).
    layer_types : tuple of type
        Module classes to convert (subclasses included), e.g. ``(nn.Linear, nn.Conv2d)``;
        ``nn.MultiheadAttention`` converts its ``in_proj_weight`` per q/k/v chunk.
    exclude : iterable of str or callable
        Qualified module names or ``fnmatch`` patterns to skip (e.g. ``["head", "*.out_proj"]``),
        or a predicate ``exclude(name, module) -> bool``.
    **opts
        Passed to :func:`sigma_reparam` (``gamma_init``, ``n_power_iterations``, ``eps``).

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(5, 4)
    >>> before = net(x)
    >>> net = convert_to_sigma_reparam(net, exclude=["2"])
    >>> sorted(sigma_reparam_state(net))
    ['0.weight']
    >>> torch.allclose(net(x), before, atol=1e-6)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layer_types = tuple(layer_types)
    if not layer_types or not all(isinstance(t, type) for t in layer_types):
        raise TypeError("layer_types must be a non-empty tuple of module classes")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not callable(exclude):
        exclude = tuple(exclude)
    for qualname, module in list(model.named_modules()):
        if not isinstance(module, layer_types) or _excluded(exclude, qualname, module):
            continue
        if isinstance(module, nn.MultiheadAttention):
            names = ("in_proj_weight",) if module.in_proj_weight is not None else (
                "q_proj_weight", "k_proj_weight", "v_proj_weight")
        else:
            names = ("weight",)
        for name in names:
            if isinstance(getattr(module, name, None), torch.Tensor) and _find(module, name) is None:
                sigma_reparam(module, name, **opts)
    return model


def _batched_pre_hook(model: nn.Module, args) -> None:
    """Forward pre-hook of :func:`batch_power_iterations`: one step per group of equal shapes."""
    if not torch.is_grad_enabled() or _compiling():
        return
    flags = model.__dict__.get("_sigma_nonfinite_flags")
    if flags:  # accelerators: the finiteness flags of the previous batched forward
        for flag, labels in flags.values():
            if bool(flag.any()):
                raise _nonfinite_error(labels[int(flag.to(torch.uint8).argmax())])
    pending = model.__dict__.setdefault("_sigma_pending", [])
    groups: dict[tuple, list[tuple[SigmaReparam, torch.Tensor, torch.Tensor]]] = {}
    for plist in model.modules():
        if not isinstance(plist, parametrize.ParametrizationList) or not hasattr(plist, "original"):
            continue
        p = plist[0]  # only a first parametrization sees the raw weight
        if not isinstance(p, SigmaReparam) or not p.training or p._batched_step is not None:
            continue
        weight = plist.original
        W = p._as_matrices(weight.detach())  # (c, m, n)
        dtype = _compute_dtype(weight.dtype)
        key = (W.shape[1:], dtype, W.device, p.n_power_iterations, p.eps)
        groups.setdefault(key, []).append((p, _cast(W, dtype), weight))
    for (_, dtype, device, n_steps, eps), members in groups.items():
        params = [p for p, _, _ in members]
        with torch.no_grad():
            if len(members) == 1:  # nothing to batch: the weight's own step, no stacking
                p, W, _ = members[0]
                u, v, sigma = _power_steps(W, _cast(p._u, dtype), _cast(p._v, dtype), n_steps, eps)
                p._u.copy_(u)
                p._v.copy_(v)
                p._batched_step = (u, v, sigma, None, None)
                pending.append(p)
                _check_group(model, params, [sigma], sigma)
                continue
            u0 = torch.cat([_cast(p._u, dtype) for p in params])  # (sum c, n)
            v0 = torch.cat([_cast(p._v, dtype) for p in params])  # (sum c, m)
            stack = model.__dict__.get("_sigma_stack")
            if stack is None:
                stack = device.type != "cpu"
            u, v, sigma = _batched_power_steps([W for _, W, _ in members], u0, v0, n_steps, eps, stack)
            sizes = [p.n_chunks for p in params]
            us, vs, sigmas = u.split(sizes), v.split(sizes), sigma.split(sizes)
            torch._foreach_copy_([p._u for p in params], list(us))
            torch._foreach_copy_([p._v for p in params], list(vs))
        for p, ui, vi, si in zip(params, us, vs, sigmas):
            p._batched_step = (ui, vi, si, None, None)
        pending.extend(params)
        _check_group(model, params, sigmas, sigma)
        sources = [w for _, _, w in members]
        if (all(w.ndim == 2 and w.dtype == dtype for w in sources)
                and not torch.is_autocast_enabled(device.type)):
            # W_hat of the whole group in one autograd node (one closed-form backward)
            gammas = [p.gamma for p in params]
            outs = _GroupScaleBySigma.apply(eps, tuple(sizes), len(params), *sources, *gammas, u, v, sigma)
            for p, ui, vi, si, out, w in zip(params, us, vs, sigmas, outs, sources):
                p._batched_step = (ui, vi, si, out, w)


def _batched_power_steps(Ws: list[torch.Tensor], u: torch.Tensor, v: torch.Tensor, n_steps: int,
                         eps: float, stack: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_power_steps` on the matrices of ``Ws`` (each (c_i, m, n)) with u (N, n), v (N, m), N = sum c_i.

    ``stack``: concatenate the matrices and use one ``bmm`` (fewest operations: accelerators);
    else one matrix-vector product per matrix and the rest batched (no copy of the weights,
    which on a CPU costs as much as the operations it saves).
    """
    if stack:
        return _power_steps(torch.cat(Ws), u, v, n_steps, eps)
    mats = [M for W in Ws for M in W.unbind(0)]  # N matrices (m, n)
    sigma = None
    for _ in range(n_steps):
        v, _ = _normalize_or_keep(torch.stack([torch.mv(M, x) for M, x in zip(mats, u.unbind(0))]), v, eps)
        u, sigma = _normalize_or_keep(torch.stack([torch.mv(M.T, y) for M, y in zip(mats, v.unbind(0))]), u, eps)
    return u, v, sigma


def _check_group(model: nn.Module, params: list[SigmaReparam], sigmas, sigma: torch.Tensor) -> None:
    """The finiteness check of :meth:`SigmaReparam._check_finite` for a group, in one host read
    on the CPU; elsewhere one flag tensor per group, read at the next batched forward."""
    if sigma.device.type in SigmaReparam.SYNC_CHECK_DEVICES:
        if not bool(torch.isfinite(sigma).all()):
            bad = next(p for p, s in zip(params, sigmas) if not bool(torch.isfinite(s).all()))
            raise _nonfinite_error(bad.label)
        return
    flags = model.__dict__.setdefault("_sigma_nonfinite_flags", {})
    key = tuple(id(p) for p in params)
    labels = [p.label for p in params for _ in range(p.n_chunks)]
    if key not in flags or flags[key][0].numel() != sigma.numel():
        pin = sigma.device.type == "cuda"
        flags[key] = (torch.zeros(sigma.numel(), dtype=torch.bool, pin_memory=pin), labels)
    flags[key][0].copy_(~torch.isfinite(sigma), non_blocking=True)


def _nonfinite_error(label: str) -> FloatingPointError:
    return FloatingPointError(
        f"sigma_reparam: {label} has non-finite entries (sigma estimate not finite); "
        f"the weight diverged (lower the learning rate?)")


def _batched_post_hook(model: nn.Module, args, output) -> None:
    """Forward hook of :func:`batch_power_iterations` (always called): drop steps not consumed
    (a weight the forward did not read, or read only under ``no_grad``), so that no later
    forward uses them."""
    if _compiling():
        return
    pending = model.__dict__.get("_sigma_pending")
    while pending:
        pending.pop()._batched_step = None


def _remove_batch_hooks(model: nn.Module) -> bool:
    """Remove the hooks of :func:`batch_power_iterations` from ``model``; True if there were any."""
    found = False
    for hid, fn in list(model._forward_pre_hooks.items()):
        if fn is _batched_pre_hook:
            del model._forward_pre_hooks[hid]
            found = True
    for hid, fn in list(model._forward_hooks.items()):
        if fn is _batched_post_hook:
            del model._forward_hooks[hid]
            model._forward_hooks_always_called.pop(hid, None)
            found = True
    model.__dict__.pop("_sigma_nonfinite_flags", None)
    model.__dict__.pop("_sigma_stack", None)
    for p in model.__dict__.pop("_sigma_pending", ()):
        p._batched_step = None
    return found


def batch_power_iterations(model: nn.Module, enabled: bool = True, *, stack: bool | None = None) -> nn.Module:
    r"""Run the power-iteration steps of ``model``'s σReparam weights batched, one per shape.

    Registers a forward pre-hook on ``model``: in each forward of ``model`` with grad enabled
    it groups the σReparam weights in training mode by matrix shape, dtype and device, and
    advances each group by one step of eq. (σReparam)'s power iteration,
    :math:`v \leftarrow Wu/\lVert Wu
Vert`, :math:`u \leftarrow W^	op v/\lVert W^	op v
Vert`,
    as one batched matrix product (``torch.cat`` of the weights, ``bmm``, batched norms)
    instead of one small step per weight.  Each weight's next training read then uses that
    step (its ``u``, ``v``, :math:`\sigma = v^	op W u`) instead of taking its own, so values,
    buffers and gradients are those of the unbatched model (up to float rounding); a weight read
    a second time in the same forward (without :func:`torch.nn.utils.parametrize.cached`)
    takes its own step, as without batching.  For 2-D weights in fp32/fp64, outside autocast,
    the hook also computes the :math:`\hat W` of every weight of a group of two or more in one
    autograd node (:class:`_GroupScaleBySigma`; the first training read returns it), whose
    backward gives the same closed-form gradients as the per-weight node in batched operations
    (the Python and per-operation overhead of ~10 small operations per weight was what a
    CPU step paid).  What changes: a training forward of ``model``
    advances every σReparam weight in training mode by one step, also one that this forward
    does not read.  Eval mode and ``no_grad`` still never change a buffer; ``state_dict`` is
    unchanged; ``copy.deepcopy`` keeps the hooks; :func:`fold_sigma_reparam` removes them;
    under ``torch.compile`` the hooks step aside (each weight takes its own step in the graph).
    Non-finite σ raises ``FloatingPointError`` naming the weight, once per group on the CPU
    and one training forward later elsewhere, as without batching.

    Parameters
    ----------
    model : nn.Module
        The model whose ``forward`` is called in training (the hook sits on it; wrap it in DDP
        afterwards as usual).
    enabled : bool
        ``False`` removes the hooks again.
    stack : bool or None
        ``True``: concatenate each group's matrices and take the step as one ``bmm`` (fewest
        operations; what a launch-bound accelerator wants).  ``False``: one matrix-vector
        product per matrix, everything else batched (no copy of the weights; measured faster
        on a CPU).  ``None`` (default): ``False`` on the CPU, ``True`` elsewhere.

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> import copy
    >>> torch.manual_seed(0) and None
    >>> net = convert_to_sigma_reparam(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    >>> twin = batch_power_iterations(copy.deepcopy(net))   # one (2, 8, 8) step per forward
    >>> x = torch.randn(4, 8)
    >>> bool(torch.allclose(net(x), twin(x), atol=1e-6))
    True
    >>> bool(torch.allclose(net[2].parametrizations.weight[0]._u, twin[2].parametrizations.weight[0]._u))
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if stack is not None and not isinstance(stack, bool):
        raise TypeError(f"stack must be a bool or None, got {type(stack).__name__}")
    _remove_batch_hooks(model)
    if enabled:
        model.__dict__["_sigma_stack"] = stack
        model.register_forward_pre_hook(_batched_pre_hook)
        model.register_forward_hook(_batched_post_hook, always_call=True)
    return model


def _sigma_modules(model: nn.Module):
    """Yield ``(qualified module name, module, tensor name, SigmaReparam)``."""
    for qualname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            p = _find(module, name)
            if p is not None:
                yield qualname, module, name, p


@torch.no_grad()
def fold_sigma_reparam(model: nn.Module) -> nn.Module:
    """Replace every σReparam weight by a plain weight equal to its current :math:`\\hat W`, in place.

    The folded model computes what the reparametrised model computes in eval mode, at the
    cost of a plain model (for inference and export).  Parameter objects are kept (their data
    is overwritten with :math:`\\hat W`); the γ parameters and the vector buffers disappear.
    Other parametrizations stacked on the same tensor are folded as well.

    >>> net = convert_to_sigma_reparam(nn.Sequential(nn.Linear(3, 3)), gamma_init="one").eval()
    >>> x = torch.randn(2, 3)
    >>> y = net(x)
    >>> torch.equal(fold_sigma_reparam(net)(x), y), is_sigma_reparametrized(net[0])
    (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for _, module, name, _ in list(_sigma_modules(model)):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for module in model.modules():
        _remove_batch_hooks(module)
        _remove_weight_cache_hooks(module)
    return model


@torch.no_grad()
def sigma_reparam_state(model: nn.Module) -> dict[str, dict[str, float]]:
    r"""Current σ estimate :math:`v^\top W u` and γ of every σReparam weight, for logging.

    Keys are qualified weight names (``"blocks.0.attn.q.weight"``); a fused q/k/v projection
    gives one entry per chunk (``"attn.in_proj_weight.q"``, ``.k``, ``.v``).  Reading the
    state never advances the power iteration.

    >>> net = nn.Sequential(SigmaReparamLinear(4, 4, gamma_init="one"))
    >>> sigma_reparam_state(net)["0.weight"]["gamma"]
    1.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state: dict[str, dict[str, float]] = {}
    for qualname, module, name, p in _sigma_modules(model):
        key = f"{qualname}.{name}" if qualname else name
        sigma = p.sigma(module.parametrizations[name].original).tolist()
        gamma = p.gamma.detach().reshape(-1).tolist()
        if p.n_chunks == 1:
            state[key] = {"sigma": sigma[0], "gamma": gamma[0]}
        else:
            labels = QKV_CHUNKS if p.n_chunks == 3 else [str(i) for i in range(p.n_chunks)]
            for label, s, g in zip(labels, sigma, gamma):
                state[f"{key}.{label}"] = {"sigma": s, "gamma": g}
    return state
