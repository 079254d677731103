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

    def _as_matrices(self, W: torch.Tensor) -> torch.Tensor:
        """``(c, rows/c, -1)`` view of the weight (conv kernels flattened per output channel)."""
        return W.reshape(self.n_chunks, W.shape[0] // self.n_chunks, -1)

    @torch.no_grad()
    def _power_iteration(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance ``_u``, ``_v`` by ``n_power_iterations`` steps; W is (c, m, n).

        Returns fresh ``(u, v, sigma)`` with sigma = |Wᵀv| = vᵀ W u (the new vectors), shape (c,).
        """
        u, v = self._u.to(W.dtype), self._v.to(W.dtype)
        for _ in range(self.n_power_iterations):
            v, _ = _normalize_or_keep(torch.matmul(W, u.unsqueeze(-1)).squeeze(-1), v, self.eps)
            u, sigma = _normalize_or_keep(torch.matmul(v.unsqueeze(-2), W).squeeze(-2), u, self.eps)
        self._u.copy_(u)
        self._v.copy_(v)
        return u, v, sigma

    #: devices on which the finiteness check reads its result at once (a cheap host read);
    #: elsewhere it is read one training forward later, so the check never stalls the device
    SYNC_CHECK_DEVICES = ("cpu",)

    def _check_finite(self, sigma: torch.Tensor) -> None:
        """Raise FloatingPointError when the sigma estimate is not finite (training only)."""
        if sigma.device.type in self.SYNC_CHECK_DEVICES:
            bad = not math.isfinite(float(sigma.sum()))
        else:  # the flag of the previous forward, copied without synchronising
            flag = getattr(self, "_nonfinite_flag", None)
            bad = flag is not None and bool(flag)
            if flag is None:
                pin = sigma.device.type == "cuda"
                flag = self._nonfinite_flag = torch.zeros((), dtype=torch.bool, pin_memory=pin)
            if not bad:
                flag.copy_(~torch.isfinite(sigma).all(), non_blocking=True)
        if bad:
            raise FloatingPointError(
                f"sigma_reparam: {self.label} has non-finite entries (sigma estimate not finite); "
                f"the weight diverged (lower the learning rate?)")

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma = v^\top W u` per chunk, shape ``(c,)``, with gradient through ``weight``.

        Uses the current vectors as they are (never advances them); not clamped.
        """
        W = self._as_matrices(weight).to(_compute_dtype(weight.dtype))
        return _vWu(self._v.to(W.dtype), W, self._u.to(W.dtype))  # (c,)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        with torch.autocast(weight.device.type, enabled=False):
            W = self._as_matrices(weight).to(_compute_dtype(weight.dtype))  # (c, m, n)
            if self.training and torch.is_grad_enabled():
                # fresh u, v (not the buffers, which the next forward overwrites) for backward
                u, v, sigma = self._power_iteration(W.detach())
                if not _compiling():
                    self._check_finite(sigma)
            else:
                u, v = self._u.to(W.dtype), self._v.to(W.dtype)
                if torch.is_grad_enabled():
                    u, v = u.clone(), v.clone()
                with torch.no_grad():
                    sigma = _vWu(v, W, u)
            gamma = self.gamma.to(W.dtype).reshape(self.n_chunks)
            out = _ScaleBySigma.apply(W, gamma, u, v, sigma, self.eps)  # (c, m, n)
        return out.reshape(weight.shape).to(weight.dtype)


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
        return W * scale[:, None, None]

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
                grad_W = torch.baddbmm(G * scale[:, None, None],
                                       (v * -coef[:, None]).unsqueeze(-1), u.unsqueeze(-2))
        return grad_W, grad_gamma, None, None, None, None


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
    return module


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
