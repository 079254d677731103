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
:math:`\hat W` unchanged).  In these formulas ``v`` is the left (output-side) and ``u`` the
right (input-side) singular vector; the *buffers* follow ``spectral_norm``'s names: ``_u`` holds
the output-side vector and ``_v`` the input-side one (checkpoints of the earlier, swapped
naming load; see :class:`SigmaReparam`).

Activation checkpointing (``torch.utils.checkpoint``, reentrant or not, and Hugging Face's
``gradient_checkpointing_enable``): a recomputation during backward reuses the step of the
forward it recomputes, so each training step takes one step and the gradient is the one
without checkpointing.  A training-mode read under ``no_grad`` (the forward of a reentrant
checkpoint, or a monitor) computes the step the next training read will take, without
changing a buffer.

A training forward whose σ estimate is not finite (the weight holds inf or NaN) raises
``FloatingPointError`` naming the weight: at once on the CPU, one training forward later on an
accelerator (the flag is copied to the host without a synchronisation, which would stall every
layer of every step).  Eval-mode and ``no_grad`` forwards do not check.

Batching: :func:`batch_power_iterations` (on by default in :func:`convert_to_sigma_reparam`) takes the steps of
all equal-shaped weights of a model as one batched operation at the start of each training
forward of the model, with the same values; each weight's first read in that forward uses
that step instead of taking its own.  For 2-D weights in fp32/fp64 outside autocast the hook
also computes the group's :math:`\hat W` at once, in one autograd node whose backward gives
every weight's closed-form gradient in a few batched operations.

Shapes: a ``Linear`` weight is used as is; a ``Conv1d``/``Conv2d`` weight is flattened to an
``(out_channels, -1)`` matrix; ``ConvTranspose`` (in, out, ...) and Hugging Face's ``Conv1D``
(in, out) weights are normalised along their output dimension, ``dim=1``;
``nn.MultiheadAttention.in_proj_weight`` is split into its
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

import copy
import fnmatch
import functools
import math
import os
import sys
import threading
import warnings
import weakref
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
    "load_sigma_reparam",
    "save_sigma_reparam",
    "scope_sigma_reparam",
    "sigma_reparam",
    "sigma_reparam_report",
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


#: a weight whose spectral norm at registration is below this gets gamma = 1 under
#: ``gamma_init="sigma"`` (with a warning): gamma = sigma(W0) would leave the layer dead
NEAR_ZERO_SIGMA = 1e-4


class _ForwardScope(threading.local):
    """Per thread: the scoped forwards under way (:func:`scope_sigma_reparam`).

    ``depth``: how many (nested) scoped forwards are running; ``epoch``: a number that changes
    when the outermost one starts (a recomputation by activation checkpointing, inside backward,
    starts none: it belongs to the forward it recomputes); ``held``: the steps whose W_hat is
    held for the rest of the outermost forward (released, to a weak reference, when it ends).
    A σReparam weight read outside any scoped forward is watched for in-place modification
    (``nn.init`` on ``module.weight``)."""

    def __init__(self) -> None:
        self.depth = 0
        self.epoch = 0
        self.held: list[_Step] = []


_SCOPE = _ForwardScope()


def _enter_scope() -> None:
    scope = _SCOPE
    if not scope.depth and not _in_backward():
        scope.epoch += 1
    scope.depth += 1


def _exit_scope() -> None:
    scope = _SCOPE
    scope.depth = max(0, scope.depth - 1)
    if not scope.depth and scope.held:
        for step in scope.held:
            step.w_hat = None
        scope.held.clear()


class _Step:
    """One power-iteration step of a weight (``u`` input side, ``v`` output side, ``sigma``),
    the key of the weight and vectors it belongs to (after it was taken), the scoped forward
    it was taken in (``epoch``, None outside one) and the W_hat computed with it: held while
    that forward runs, then only weakly (the autograd graph keeps it as long as it needs it;
    an activation-checkpoint recomputation, which finds it gone, recomputes it from the step)."""

    __slots__ = ("key", "epoch", "u", "v", "sigma", "reentrant", "w_hat", "ref", "graph")

    def __init__(self, key, epoch, u, v, sigma) -> None:
        self.key, self.epoch, self.u, self.v, self.sigma = key, epoch, u, v, sigma
        self.reentrant = False
        self.w_hat = self.ref = None
        self.graph = False

    def get(self, grad: bool) -> torch.Tensor | None:
        """The W_hat computed with this step, if alive (with an autograd graph when ``grad``)."""
        out = self.w_hat
        if out is None and self.ref is not None:
            out = self.ref()
        if out is None or (grad and not self.graph):
            return None
        return out

    def keep(self, out: torch.Tensor, graph: bool) -> torch.Tensor:
        self.ref = weakref.ref(out)
        self.graph = graph
        if _SCOPE.depth:
            if self.w_hat is None:
                _SCOPE.held.append(self)
            self.w_hat = out
        return out


def _in_reentrant_checkpoint() -> bool:
    """True inside the no_grad forward of ``torch.utils.checkpoint(..., use_reentrant=True)``
    (its ``CheckpointFunction.forward`` is on the call stack; only looked for on the rare
    training-mode reads under no_grad)."""
    frame = sys._getframe(2)
    for _ in range(400):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (activation checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


class SigmaReparam(nn.Module):
    r"""The parametrization :math:`W \mapsto (\gamma/\sigma(W))\,W` (theory/README.md, σReparam).

    Usually created by :func:`sigma_reparam`, not directly.

    Parameters
    ----------
    weight : torch.Tensor
        The weight at registration; its SVD gives the initial singular vectors.
    n_chunks : int
        The weight is viewed as ``n_chunks`` stacked blocks of output rows, each reparametrised
        on its own (3 for a fused q/k/v projection, else 1).
    dim : int
        The output dimension of the weight (0 for ``Linear``/``Conv``; 1 for ``ConvTranspose``,
        whose weight is (in, out, ...), and for Hugging Face's ``Conv1D``, whose weight is
        (in, out)), as ``dim`` of ``spectral_norm``.
    gamma_init : {"sigma", "one"} or float
        ``"sigma"``: :math:`\gamma = \sigma(W_0)`, so :math:`\hat W = W_0` at init (official
        PyTorch code; the default), except for a (near-)zero weight, :math:`\sigma(W_0) <`
        ``NEAR_ZERO_SIGMA``, which gets :math:`\gamma = 1` and a warning (a zero weight stays
        zero at init; a tiny one is rescaled to unit spectral norm).  ``"one"``:
        :math:`\gamma = 1` (paper text, official JAX code).  A float sets :math:`\gamma` directly.
    n_power_iterations : int
        Power-iteration steps per training forward (>= 1).
    eps : float
        Floor of :math:`\sigma` and of the norms in the power iteration.
    label : str
        Name of the weight, used in error messages.

    Attributes
    ----------
    gamma : nn.Parameter
        Shape ``(n_chunks,)``: ``(1,)`` for a plain weight, ``(3,)`` for split q/k/v (a 1-D
        tensor, which ``fully_shard`` accepts; a state_dict with the 0-d gamma of earlier
        versions loads); fp32 (fp64 for an fp64 weight),
        also when the weight is fp16/bf16 (``module.to(torch.bfloat16)`` leaves it fp32).
    _u, _v : torch.Tensor
        Buffers ``(n_chunks, out)`` and ``(n_chunks, in)``: the left (output-side) and right
        (input-side) singular vectors, as ``_u`` and ``_v`` of ``spectral_norm``; fp32 or fp64.
    """

    #: 2: ``_u`` output side, ``_v`` input side (spectral_norm's convention); checkpoints of
    #: version 1 (the two swapped) are converted on loading
    _version = 2
    #: (default of the instance attribute set in ``__init__``, for objects pickled before it)
    _stepped = False

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        n_chunks: int = 1,
        dim: int = 0,
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
        if not isinstance(dim, int) or not -weight.ndim <= dim < weight.ndim:
            raise ValueError(f"dim must be an int in [-{weight.ndim}, {weight.ndim}), got {dim!r}")
        if weight.numel() == 0:
            raise ValueError(f"{label}: sigma_reparam needs a weight with no zero-size dimension "
                             f"(its spectral norm is undefined), got shape {tuple(weight.shape)}")
        dim = dim % weight.ndim
        if not isinstance(n_chunks, int) or n_chunks < 1 or weight.shape[dim] % n_chunks:
            raise ValueError(f"{label}: {weight.shape[dim]} rows do not split into n_chunks={n_chunks!r}")
        if gamma_init not in ("sigma", "one"):
            if not isinstance(gamma_init, (int, float)) or isinstance(gamma_init, bool):
                raise ValueError(f'gamma_init must be "sigma", "one" or a float, got {gamma_init!r}')
            if not math.isfinite(gamma_init):
                raise ValueError(f"gamma_init must be finite, got {gamma_init!r}")
        self.n_chunks = n_chunks
        self.dim = dim
        self.n_power_iterations = n_power_iterations
        self.eps = float(eps)
        self.label = label
        cdtype = _compute_dtype(weight.dtype) if weight.dtype.is_floating_point else torch.float32
        c = n_chunks
        m = weight.shape[dim] // c
        n = weight.numel() // weight.shape[dim]
        self.register_buffer("_u", torch.zeros(c, m, dtype=cdtype, device=weight.device))
        self.register_buffer("_v", torch.zeros(c, n, dtype=cdtype, device=weight.device))
        self.gamma = nn.Parameter(torch.ones(c, dtype=cdtype, device=weight.device))  # (c,): fully_shard refuses 0-d
        self._init_from(weight.detach(), gamma_init)
        #: fresh ``(u_in, v_out, sigma, W_hat, source)`` of this forward's step, set by a batched
        #: step (:func:`batch_power_iterations`) and dropped when the model's forward ends (W_hat,
        #: source: the weight's W_hat computed with its group and the raw weight, or None, None)
        self._batched_step: tuple | None = None
        #: the last step taken (:class:`_Step`, with the W_hat of its forward), and a step
        #: computed but not yet taken (a training-mode read under no_grad); keyed by the weight's
        #: identity and version and the vectors' version.  Every read in the same scoped forward
        #: and a recomputation by activation checkpointing (inside backward) reuse the step and
        #: W_hat of their forward; ``_eval`` is the same for reads in eval mode.
        self._last: _Step | None = None
        self._peek: _Step | None = None
        self._eval: _Step | None = None
        #: under torch.compile: whether this weight stepped in the scoped forward under way in
        #: the graph (:data:`_COMPILED_SCOPE`; only the first training read steps)
        _set(self, "_stepped", False)
        self._registering = True

    @torch.no_grad()
    def _init_from(self, weight: torch.Tensor, gamma_init) -> None:
        """Vectors from an exact SVD of ``weight``; gamma by ``gamma_init`` (None: keep gamma)."""
        if weight.is_meta:  # no values to take an SVD of: the buffers keep their shapes (to_empty, then load)
            return
        W = self._as_matrices(weight).to(self._u.dtype)  # (c, m, n)
        if not torch.isfinite(W).all():
            raise ValueError(f"{self.label}: cannot register sigma_reparam on a non-finite weight")
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (c,m,k) (c,k) (c,k,n)
        sigma0 = S[:, 0]  # (c,)
        self._u.copy_(U[:, :, 0])
        self._v.copy_(Vh[:, 0, :])
        if gamma_init == "sigma":
            small = sigma0 < NEAR_ZERO_SIGMA
            if bool(small.any()):
                warnings.warn(
                    f"sigma_reparam: {self.label} is (near) zero (sigma(W0) = {sigma0.min().item():.3g} < "
                    f"{NEAR_ZERO_SIGMA:g}); gamma = 1 there instead of sigma(W0), which would leave the "
                    f"layer dead (a zero weight stays zero at init, a tiny one is rescaled to unit "
                    f"spectral norm)", stacklevel=4)
            gamma = torch.where(small, torch.ones_like(sigma0), sigma0)
        elif gamma_init == "one":
            gamma = torch.ones_like(sigma0)
        elif gamma_init is None:
            return
        else:
            gamma = torch.full_like(sigma0, float(gamma_init))
        self.gamma.copy_(gamma.reshape(self.gamma.shape))

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """``module.weight = value``: the raw weight becomes ``value``, the vectors its singular
        vectors and gamma its spectral norm (per chunk), so that the reparametrised weight equals
        ``value`` (a (near) zero ``value`` gets gamma = 1, as at registration)."""
        if self.__dict__.pop("_registering", False):  # torch calls it once at registration
            return value
        if not isinstance(value, torch.Tensor) or _matrix_shape(self, value) is None:
            raise ValueError(f"{self.label}: the assigned value must be a tensor of the weight's shape")
        self._init_from(value.detach(), "sigma")
        self._forget()
        self.__dict__.pop("_handed", None)
        return value

    def _as_matrices(self, W: torch.Tensor) -> torch.Tensor:
        """``(c, rows/c, -1)`` view of the weight (output dimension first, the rest flattened)."""
        if self.dim:
            W = W.movedim(self.dim, 0)
        return W.reshape(self.n_chunks, W.shape[0] // self.n_chunks, -1)

    def _from_matrices(self, M: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_as_matrices`: ``M`` back to ``weight``'s shape and layout."""
        if not self.dim:
            return M.reshape(weight.shape)
        return M.reshape(weight.movedim(self.dim, 0).shape).movedim(0, self.dim)

    def _apply(self, fn, recurse=True):
        # a model cast to fp16/bf16 keeps gamma and the vectors in fp32 (only devices move)
        keep = {"gamma": self.gamma.data, "_u": self._u, "_v": self._v}  # (.data: _apply may
        out = super()._apply(fn, recurse)                                    # swap it in place)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype and new.dtype in (torch.float16, torch.bfloat16):
                restored = old.to(new.device)
                if name == "gamma":
                    self.gamma.data = restored
                else:
                    setattr(self, name, restored)
        return out

    #: per-forward caches, dropped by ``copy.deepcopy`` and pickling: the step of the last or
    #: pending forward (``_last``, ``_peek``, ``_batched_step``: keyed by the weight's storage,
    #: so never valid for a copy, and ``_batched_step`` may hold a W_hat with autograd history)
    #: and the W_hat last read outside a forward (``_handed``: a tensor with autograd history
    #: after a read with grad, which ``deepcopy`` refuses, and whose copy's version counter
    #: differs, which the in-place check would take for an edit)
    _TRANSIENT = ("_last", "_peek", "_eval", "_batched_step", "_handed")

    def _forget(self) -> None:
        """Drop the cached steps (the weight or the vectors were replaced)."""
        for name in ("_last", "_peek", "_eval"):
            _set(self, name, None)

    def __getstate__(self):
        state = super().__getstate__()
        for name in self._TRANSIENT:
            if name in state:
                state[name] = None
        state.pop("_handed", None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        kg, ku, kv = prefix + "gamma", prefix + "_u", prefix + "_v"
        g = state_dict.get(kg)
        if isinstance(g, torch.Tensor) and g.ndim == 0 and tuple(self.gamma.shape) == (1,):
            state_dict[kg] = g.reshape(1)  # checkpoints before gamma became (1,) hold a 0-d gamma
        if ku in state_dict and kv in state_dict and _old_convention(
                self, state_dict, prefix, local_metadata.get("version")):
            state_dict[ku], state_dict[kv] = state_dict[kv], state_dict[ku]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._forget()

    def _key(self, weight: torch.Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, self._u._version)

    @torch.no_grad()
    def _power_iteration(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance ``_u``, ``_v`` by ``n_power_iterations`` steps; W is (c, m, n).

        Returns fresh ``(u_in, v_out, sigma)`` with sigma = |Wᵀv_out| = v_outᵀ W u_in, shape (c,).
        """
        u, v, sigma = _power_steps(W, _cast(self._v, W.dtype), _cast(self._u, W.dtype),
                                   self.n_power_iterations, self.eps)
        self._commit(u, v)
        return u, v, sigma

    @torch.no_grad()
    def _commit(self, u_in: torch.Tensor, v_out: torch.Tensor) -> None:
        self._v.copy_(u_in)
        self._u.copy_(v_out)

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
        r""":math:`\sigma = u^\top W v` per chunk, shape ``(c,)``, with gradient through ``weight``.

        Uses the current vectors as they are (never advances them); not clamped.
        """
        W = self._as_matrices(weight).to(_compute_dtype(weight.dtype))
        return _vWu(self._u.to(W.dtype), W, self._v.to(W.dtype))  # (c,)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if weight.is_meta:  # shapes only (e.g. a model built on the meta device, then to_empty)
            return torch.empty_like(weight)
        # autocast off for the whole computation; entering the context manager costs more than
        # the rest of a small layer's reparametrisation, so only when autocast is on
        if _compiling() or torch.is_autocast_enabled(weight.device.type):
            with torch.autocast(weight.device.type, enabled=False):
                return self._reparametrize(weight)
        return self._reparametrize(weight)

    def _training_step(self, weight: torch.Tensor, W: torch.Tensor, key: tuple, grad: bool) -> _Step:
        """The step of a training-mode read.

        With grad: the step of this scoped forward if one was taken (every later read of the
        weight in the same forward, and a recomputation by activation checkpointing inside
        backward, reuse it and its W_hat); else the step a no_grad read computed for these very
        weight and vectors (the forward of a reentrant checkpoint, recomputed now, or simply the
        same values), taken now; else a new step.  Under no_grad: this forward's step if taken,
        else the step the next training read will take, computed without changing a buffer.
        """
        scope = _SCOPE
        last = self._last
        peek = self._peek
        backward = _in_backward()
        current = last is not None and last.key == key and (
            backward or (scope.depth > 0 and last.epoch == scope.epoch))
        if grad:
            if backward and peek is not None and peek.reentrant and peek.key == key:
                return self._take(peek, weight)
            if current:
                return last
            if peek is not None and peek.key == key and not backward:
                return self._take(peek, weight)
            u, v, sigma = self._power_iteration(W.detach())
            self._check_finite(sigma)
            step = _Step(self._key(weight), scope.epoch if scope.depth else None, u, v, sigma)
            _set(self, "_last", step)
            _set(self, "_peek", None)
            return step
        if current:
            return last
        if peek is None or peek.key != key:
            u, v, sigma = _power_steps(W.detach(), _cast(self._v, W.dtype), _cast(self._u, W.dtype),
                                       self.n_power_iterations, self.eps)
            peek = _Step(key, scope.epoch if scope.depth else None, u, v, sigma)
            _set(self, "_peek", peek)
        if not peek.reentrant and _in_reentrant_checkpoint():
            peek.reentrant = True
        return peek

    def _take(self, step: _Step, weight: torch.Tensor) -> _Step:
        """Take a step computed under no_grad: the vectors become its vectors."""
        self._commit(step.u, step.v)
        self._check_finite(step.sigma)
        scope = _SCOPE
        step.key, step.epoch = self._key(weight), (scope.epoch if scope.depth else None)
        _set(self, "_last", step)
        _set(self, "_peek", None)
        return step

    def _reparametrize(self, weight: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return self._reparametrize_compiled(weight)
        handed = self.__dict__.pop("_handed", None)
        if handed is not None and handed[0]._version != handed[1]:
            raise RuntimeError(
                f"sigma_reparam: {self.label} was modified in place after it was read (e.g. "
                f"nn.init.normal_(module.weight)); that changes a computed copy "
                f"gamma/sigma(W) * W, not the weight.  Assign instead "
                f"(module.weight = nn.init.normal_(torch.empty_like(module.weight))) or initialise "
                f"module.parametrizations.weight.original")
        out = self._reparametrize_(weight)
        if not _SCOPE.depth:  # a read outside a model forward: watch for in-place edits
            self.__dict__["_handed"] = (out, out._version)
        return out

    def _reparametrize_(self, weight: torch.Tensor) -> torch.Tensor:
        W = _cast(self._as_matrices(weight), _compute_dtype(weight.dtype))  # (c, m, n)
        grad = torch.is_grad_enabled()
        key = self._key(weight)
        if self.training:
            step = self._training_step(weight, W, key, grad)
        else:  # the vectors as they are; one W_hat per scoped forward
            scope = _SCOPE
            step = self._eval
            if step is None or step.key != key or not scope.depth or step.epoch != scope.epoch:
                u, v = _cast(self._v, W.dtype), _cast(self._u, W.dtype)
                if grad:
                    u, v = u.clone(), v.clone()
                with torch.no_grad():
                    sigma = _vWu(v, W, u)
                step = _Step(key, scope.epoch if scope.depth else None, u, v, sigma)
                _set(self, "_eval", step if scope.depth else None)
        out = step.get(grad)
        if out is not None:
            return out
        gamma = _cast(self.gamma, W.dtype).reshape(self.n_chunks)
        out = _ScaleBySigma.apply(W, gamma, step.u, step.v, step.sigma, self.eps)  # (c, m, n)
        return step.keep(_cast(self._from_matrices(out, weight), weight.dtype), grad)

    def _reparametrize_compiled(self, weight: torch.Tensor) -> torch.Tensor:
        """Under ``torch.compile``: a training read with grad takes a step in the graph (fresh u,
        v, not the buffers, which the next forward overwrites, for backward), once per scoped
        forward as in eager mode (the first read; T5 reads ``wo.weight`` three times), and not
        at all when the eager hook of :func:`batch_power_iterations` took this forward's step
        (a model whose blocks alone are compiled).  No finiteness check: reading the flag would
        break the graph (a diverged weight shows as a non-finite loss)."""
        W = _cast(self._as_matrices(weight), _compute_dtype(weight.dtype))  # (c, m, n)
        scope = _COMPILED_SCOPE
        fresh = self._batched_step is None and not (scope.depth and self._stepped)
        if self.training and torch.is_grad_enabled() and fresh:
            if scope.depth:
                _set(self, "_stepped", True)
                scope.stepped.append(self)
            u, v, sigma = self._power_iteration(W.detach())
        else:
            u, v = _cast(self._v, W.dtype), _cast(self._u, W.dtype)
            if torch.is_grad_enabled():
                u, v = u.clone(), v.clone()
            with torch.no_grad():
                sigma = _vWu(v, W, u)
        gamma = _cast(self.gamma, W.dtype).reshape(self.n_chunks)
        out = _ScaleBySigma.apply(W, gamma, u, v, sigma, self.eps)  # (c, m, n)
        return _cast(self._from_matrices(out, weight), weight.dtype)


def _old_convention(p: SigmaReparam, state_dict, prefix: str, version) -> bool:
    """Whether the ``_u``/``_v`` of a checkpoint are swapped (version 1: ``_u`` input side).

    With the module's version in the checkpoint's metadata that decides; without it (e.g. a
    safetensors file) the shapes do, and for a square matrix the values: the right pairing
    gives the larger |uᵀ W v| (the power iteration's fixed point)."""
    if version is not None:
        return version < 2
    u, v = state_dict[prefix + "_u"], state_dict[prefix + "_v"]
    if u.shape != v.shape:
        return tuple(u.shape) == tuple(p._v.shape)
    return False  # square: decided by value in the owning module's hook (_load_plain_weight)


def _swapped_by_value(p: SigmaReparam, W: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> bool:
    W, u, v = _whole(W), _whole(u), _whole(v)  # (a sharded model's full state arrives as DTensors)
    M = p._as_matrices(W.detach()).to(u.dtype)
    new = _vWu(u.to(M.dtype), M, v.to(M.dtype)).abs().sum()
    old = _vWu(v.to(M.dtype), M, u.to(M.dtype)).abs().sum()
    return bool(old > new)


_set = object.__setattr__  # plain attributes of hot paths, without nn.Module.__setattr__


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

    The inputs are kept on ``ctx`` (:func:`_keep_inputs`), not by ``save_for_backward``: the node
    saves nothing that saved-tensor hooks see, so activation checkpointing gets the same saved
    tensors whether a read computes W_hat or reuses the W_hat of its forward.
    """

    @staticmethod
    def forward(ctx, W, gamma, u, v, sigma, eps):  # noqa: D102
        scale = gamma / sigma.clamp_min(eps)  # (c,)
        _keep_inputs(ctx, (W,), (W, gamma, u, v, sigma))
        ctx.eps = eps
        return W * scale.view(-1, 1, 1)

    @staticmethod
    def backward(ctx, G):  # noqa: D102
        W, gamma, u, v, sigma = _kept_inputs(ctx)
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


def _keep_inputs(ctx, weights, tensors) -> None:
    """Keep a node's ``tensors`` (its inputs, none of them its output: no reference cycle) on
    ``ctx`` with the versions of ``weights``, which :func:`_kept_inputs` checks as
    ``save_for_backward`` would.  Under ``torch.compile``: ``save_for_backward``."""
    if _compiling():
        ctx.save_for_backward(*tensors)
        return
    ctx.kept = tensors
    ctx.versions = [(w, w._version) for w in weights]


def _kept_inputs(ctx) -> tuple:
    kept = getattr(ctx, "kept", None)
    if kept is None:
        return ctx.saved_tensors
    for w, version in ctx.versions:
        if w._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a sigma_reparam weight of shape {tuple(w.shape)} is at "
                f"version {w._version}; expected version {version} instead (it was changed "
                f"between the forward and this backward, e.g. by optimizer.step())")
    return kept


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
        _keep_inputs(ctx, Ws, (gamma, u, v, sigma, *Ws, *gammas))
        ctx.eps, ctx.sizes, ctx.k = eps, sizes, k
        return tuple(torch._foreach_mul(list(Ws), rows))

    @staticmethod
    def backward(ctx, *Gs):  # noqa: D102
        eps, sizes, k = ctx.eps, ctx.sizes, ctx.k
        gamma, u, v, sigma, *rest = _kept_inputs(ctx)
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
                gg.append((gw / sig).reshape(gi.shape))
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
        grad_gammas = [g.reshape(gi.shape) if n else None
                       for g, gi, n in zip(grad_gamma, gammas, gammas_in)]
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
    dim: int | None = None,
    n_chunks: int | None = None,
    label: str | None = None,
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
    dim : int or None
        The weight's output dimension (``None``: 1 for ``ConvTranspose*d`` and Hugging Face
        ``Conv1D``, else 0, as in ``spectral_norm``).
    n_chunks : int or None
        Split the output rows into this many equal blocks, each with its own σ and γ (a fused
        q/k/v projection: 3).  ``None``: 3 for ``MultiheadAttention.in_proj_weight``, else 1.
    label : str or None
        Name used in warnings and errors (default: ``name``).

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
    if n_chunks is None:
        n_chunks = 3 if isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight" else 1
    if dim is None:
        dim = _output_dim(module, name)
    param = SigmaReparam(weight, n_chunks=n_chunks, dim=dim, label=label or name, **opts)
    # unsafe=True: no consistency call of forward at registration (it would be a no-op anyway,
    # but this keeps the SVD vectors exactly as computed)
    parametrize.register_parametrization(module, name, param, unsafe=True)
    param.__dict__.pop("_registering", None)
    _own_class_on_deepcopy(module)
    if not any(getattr(h, "func", None) is _load_plain_weight
               for h in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(functools.partial(_load_plain_weight))
    if refuse_plain_hf_save not in module._state_dict_pre_hooks.values():  # (reparam_io)
        module.register_state_dict_pre_hook(refuse_plain_hf_save)
    if isinstance(module, nn.MultiheadAttention):
        _cache_weights_per_forward(module)
    return module


def _output_dim(module: nn.Module, name: str) -> int:
    """The output dimension of ``module.<name>``, as ``spectral_norm`` chooses it: 1 for
    ``ConvTranspose`` (in, out, ...) and Hugging Face's ``Conv1D`` (in, out), else 0."""
    if name != "weight":
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd) or _is_hf_conv1d(module):
        return 1
    return 0


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2): a linear layer whose weight
    is stored (in, out); recognised without importing transformers."""
    return (parametrize.type_before_parametrizations(module).__name__ == "Conv1D"
            and hasattr(module, "nf") and not isinstance(module, nn.Conv1d))


def _load_plain_weight(module: nn.Module, state_dict, prefix, local_metadata, strict,
                       missing_keys, unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of a σReparam'd module: an entry ``<prefix><name>`` of a plain
    (unconverted) state_dict becomes the raw weight, with the vectors of its SVD and gamma =
    its spectral norm, so that the reparametrised weight equals the loaded one (pretrained
    weights load after conversion)."""
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():
        p = plist[0]
        key, base = prefix + name, f"{prefix}parametrizations.{name}."
        ku, kv, ko = f"{base}0._u", f"{base}0._v", base + "original"
        if (isinstance(p, SigmaReparam) and local_metadata.get("version") is None
                and all(k in state_dict for k in (ku, kv, ko))
                and state_dict[ku].shape == state_dict[kv].shape
                and _swapped_by_value(p, state_dict[ko], state_dict[ku], state_dict[kv])):
            state_dict[ku], state_dict[kv] = state_dict[kv], state_dict[ku]  # version-1 names
        if not isinstance(p, SigmaReparam) or key not in state_dict or base + "original" in state_dict:
            continue
        value = state_dict.pop(key)
        if not isinstance(value, torch.Tensor) or _matrix_shape(p, value) is None:
            error_msgs.append(f"size mismatch for {key}: cannot load into the sigma_reparam weight")
            continue
        fresh = SigmaReparam(value.detach().to(device=p._u.device), n_chunks=p.n_chunks, dim=p.dim,
                             eps=p.eps, label=key, gamma_init="sigma")
        state_dict[base + "original"] = value
        for k, t in (("gamma", fresh.gamma.detach()), ("_u", fresh._u), ("_v", fresh._v)):
            state_dict[f"{base}0.{k}"] = t
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            metadata[f"{base}0"] = {"version": SigmaReparam._version}
        local_metadata.setdefault("_sigma_plain", []).append(key)


def _matrix_shape(p: SigmaReparam, value: torch.Tensor):
    c, m = p._u.shape
    n = p._v.shape[1]
    ok = value.ndim >= 2 and value.shape[p.dim] == c * m and value.numel() == c * m * n
    return value.shape if ok else None


def _private_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.  torch's parametrize makes one class per
    registration, and ``copy.deepcopy`` shares it between original and copy; removing a
    parametrization from one (``fold_sigma_reparam``, ``remove_parametrizations``) deletes the
    property from the class and so breaks the other."""
    cls = module.__class__
    if not parametrize.is_parametrized(module) or cls.__dict__.get("_sigma_private_of") == id(module):
        return
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    body["_sigma_private_of"] = id(module)
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def _deepcopy_own_class(self, memo):
    """``__deepcopy__`` of a σReparam'd module: torch's (a copy of ``__dict__``), and the copy
    gets its own class (see :func:`_private_class`)."""
    obj = memo.get(id(self))
    if obj is not None:
        return obj
    replica = self.__new__(self.__class__)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    _private_class(replica)
    return replica


def _own_class_on_deepcopy(module: nn.Module) -> None:
    cls = module.__class__
    if cls.__dict__.get("__deepcopy__") is not _deepcopy_own_class:
        base = cls.__bases__[0]
        if "__deepcopy__" in cls.__dict__ or getattr(base, "__deepcopy__", None) is None:
            cls.__deepcopy__ = _deepcopy_own_class


def _enter_weight_cache(module: nn.Module, args) -> None:
    """Forward pre-hook of :func:`scope_sigma_reparam`: a scoped forward starts.  (Under
    torch.compile: the σReparam weights inside ``module`` step at their first read only.)"""
    if _compiling():
        _enter_compiled_scope(module, _enter_weight_cache)
    else:
        _enter_scope()


def _exit_weight_cache(module: nn.Module, args, output) -> None:
    """Forward hook (always called, also when the forward raises): the scoped forward ends."""
    if _compiling():
        _exit_compiled_scope(module, _enter_weight_cache)
    else:
        _exit_scope()


class _CompiledScopeState:
    """The scoped forwards under way inside a graph (what :class:`_ForwardScope` is in eager
    mode): ``open`` (the nested scoped forwards, as ``(module, hook)`` pairs, outermost first)
    and the σReparam weights that stepped in them.  Plain Python state, which dynamo traces as
    side effects; back to ``[], []`` when the outermost one ends, so the guards of the next call
    see the same values (no recompilation).

    A forward whose compilation fails after its pre-hooks' frame ran (a backend error: no C++
    compiler, an unsupported operation) never runs its end hooks, and its entry stays open.  A
    module cannot be inside its own forward, so the next forward of that module through the same
    hook finds the entry and starts from a clean state (else its weights would never step again).
    A stale entry of *another* model is not detected: ``reset_compiled_scope()`` clears it."""

    def __init__(self) -> None:
        self.open: list[tuple[nn.Module, object]] = []
        self.stepped: list[SigmaReparam] = []

    @property
    def depth(self) -> int:
        return len(self.open)

    def clear(self) -> None:
        for param in self.stepped:
            _set(param, "_stepped", False)
        self.stepped.clear()
        self.open.clear()


_COMPILED_SCOPE = _CompiledScopeState()


def reset_compiled_scope() -> None:
    """Forget every scoped forward left open by a failed compilation (see
    :class:`_CompiledScopeState`): call it after a ``torch.compile`` error when another σReparam
    model is compiled next in the same process.  Harmless when none is open."""
    _COMPILED_SCOPE.clear()


def _enter_compiled_scope(module: nn.Module, hook=None) -> None:
    """A scoped forward starts inside a graph: every σReparam weight steps at its first
    training read only, until the outermost scoped forward ends."""
    scope = _COMPILED_SCOPE
    if any(m is module and h is hook for m, h in scope.open):  # left open by a failed compile
        scope.clear()
    scope.open.append((module, hook))


def _exit_compiled_scope(module: nn.Module, hook=None) -> None:
    scope = _COMPILED_SCOPE
    if scope.open:
        scope.open.pop()
    if not scope.open:
        scope.clear()


def _cache_weights_per_forward(module: nn.Module) -> None:
    """Register the hooks of :func:`scope_sigma_reparam` on ``module`` (once)."""
    if _enter_weight_cache in module._forward_pre_hooks.values():
        return
    module.register_forward_pre_hook(_enter_weight_cache)
    module.register_forward_hook(_exit_weight_cache, always_call=True)


def _remove_weight_cache_hooks(module: nn.Module) -> bool:
    found = False
    for hooks, fn in ((module._forward_pre_hooks, _enter_weight_cache),
                      (module._forward_hooks, _exit_weight_cache)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            getattr(module, "_forward_hooks_always_called", {}).pop(key, None)
            found = True
    return found


def scope_sigma_reparam(model: nn.Module, enabled: bool = True) -> nn.Module:
    r"""Make each forward of ``model`` one unit of σReparam work: one :math:`\hat W` and one
    power-iteration step per weight, however often the forward reads the weight.

    Registers a forward pre-hook and an always-called forward hook on ``model``.  During a
    forward of ``model`` the first read of a σReparam weight (in training mode with grad:
    also its power-iteration step) computes :math:`\hat W`; every later read in the same
    forward returns that same tensor: a second call of the same layer (shared weights), a
    parent module that checks ``layer.weight.dtype`` or ``isinstance(layer.weight, ...)``
    before calling the layer (Hugging Face's ``T5DenseActDense`` reads ``wo.weight`` three
    times), ``nn.MultiheadAttention``'s own checks.  A recomputation by activation
    checkpointing (``torch.utils.checkpoint``, reentrant or not, and Hugging Face's
    ``gradient_checkpointing_enable``) reuses the step and the :math:`\hat W` values of the
    forward it recomputes, so the saved tensors and the gradient are those of the run without
    checkpointing.  :math:`\hat W` is held until the forward ends, then only as long as
    autograd keeps it.

    :func:`convert_to_sigma_reparam` calls it on the model it converts (``batched=True`` or not;
    :func:`batch_power_iterations` includes it); :func:`sigma_reparam` on an
    ``nn.MultiheadAttention``.  Call it on your model's top module when you register
    σReparam by hand (:func:`sigma_reparam`, :class:`SigmaReparamLinear`).  A read outside any
    scoped forward (``layer(x)`` on its own, ``layer.weight`` in a training loop) is a forward
    of its own: one step per read.  Under ``torch.compile`` the same holds inside the graph
    (one step per weight per forward, at its first read).

    Parameters
    ----------
    model : nn.Module
        The module whose forward is the unit (the one your training loop calls).
    enabled : bool
        ``False`` removes the hooks again.

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = SigmaReparamLinear(4, 4), SigmaReparamLinear(4, 4)
    ...     def forward(self, x):
    ...         x = x.to(self.b.weight.dtype)   # a read before the layer's own
    ...         return self.b(self.a(self.a(x)))
    >>> net = scope_sigma_reparam(Net())
    >>> p = net.a.parametrizations.weight[0]
    >>> before = p._u._version
    >>> net(torch.randn(2, 4)).sum().backward()
    >>> p._u._version - before                       # a read twice: one step
    1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if enabled:
        _cache_weights_per_forward(model)
    else:
        _remove_weight_cache_hooks(model)
    return model


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


#: last name component of fused q/k/v projections that ``split_qkv`` splits into q, k and v
#: (GPT-2 ``c_attn``, timm/DINO ``qkv``, MPT ``Wqkv``); each must hold equal-sized blocks
QKV_NAMES = ("c_attn", "qkv", "Wqkv", "qkv_proj", "in_proj")
#: class names (case-insensitive substrings) of modules treated as attention for the warning
ATTENTION_HINTS = ("attention", "attn")
#: last name components of fused q/k/v projections whose rows interleave q, k and v per head
#: (GPT-NeoX, BLOOM and Falcon ``query_key_value``): never split into equal row blocks, which
#: would mix q, k and v; they keep one sigma, and the report says why
INTERLEAVED_QKV_NAMES = ("query_key_value",)
#: lookup tables (rows are looked up, not multiplied): token embeddings and T5's
#: ``relative_attention_bias``; left unconverted without the attention-module warning
LOOKUP_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _fused_qkv_reason(leaf: str, split_qkv: bool) -> str:
    """The report's note for a fused q/k/v projection that keeps one sigma ("" if not one)."""
    if leaf in INTERLEAVED_QKV_NAMES:
        return ("fused q/k/v with rows interleaved per head (q, k, v of head 0, then of head 1, "
                "...): not split into row blocks, which would mix q, k and v; one sigma for the "
                "whole matrix (the bound then holds with the fused matrix's gamma)")
    if leaf in QKV_NAMES and not split_qkv:
        return "fused q/k/v, split_qkv=False: one sigma for the whole matrix"
    if leaf not in QKV_NAMES and "qkv" in leaf.lower():
        return ("fused q/k/v? (name not in QKV_NAMES, row layout unknown): one sigma for the "
                "whole matrix; sigma_reparam(module, n_chunks=3) splits contiguous q/k/v blocks")
    return ""


def _default_layer_types() -> tuple:
    return (nn.Linear, nn.MultiheadAttention, "Conv1D")


def _weight_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own floating parameters with >= 2 dims (parametrized or not; none
    for the ``ParametrizationList`` holding a parametrized weight's ``original``)."""
    if isinstance(module, parametrize.ParametrizationList):
        return []
    names = []
    plists = module.__dict__.get("_modules", {}).get("parametrizations")
    for name in list(module._parameters) + (list(plists.keys()) if plists is not None else []):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.dtype.is_floating_point:
            names.append(name)
    return names


def _matches_type(module: nn.Module, layer_types) -> bool:
    for t in layer_types:
        if t == "Conv1D":
            if _is_hf_conv1d(module):
                return True
        elif isinstance(module, t):
            return True
    return False


def convert_to_sigma_reparam(
    model: nn.Module,
    *,
    layer_types: Iterable | None = None,
    exclude: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    split_qkv: bool = True,
    batched: bool = True,
    **opts,
) -> nn.Module:
    """Register σReparam on every projection of ``model``, in place.

    Weights are kept (with the default ``gamma_init="sigma"`` the outputs do not change).
    What was converted, what was skipped and why: :func:`sigma_reparam_report`.  An
    attention-like module (``nn.MultiheadAttention`` or a class whose name contains
    "Attention"/"Attn") with a weight left unconverted for another reason than ``exclude``
    triggers a ``UserWarning`` naming it; lookup tables (``nn.Embedding``, e.g. T5's
    ``relative_attention_bias``, a table of position biases) are not projections and do not.  A weight shared by several modules (tied weights,
    e.g. GPT-2's ``wte``/``lm_head``) is left alone with a warning: reparametrising it in one
    place only would change the other.  A Hugging Face ``PreTrainedModel`` gets, on this instance
    only, a ``save_pretrained`` that writes the folded model (``from_pretrained`` of the plain
    class reads it) and the σReparam state (``sigma_reparam.safetensors``, for
    :func:`load_sigma_reparam`), and a load_state_dict pre-hook that maps transformers' legacy
    key names back to the model's own (``sigma_core/reparam_io.py``).

    Parameters
    ----------
    model : nn.Module
        Converted in place (weights already carrying σReparam are left alone).
    layer_types : iterable of type or "Conv1D", or None
        Module classes to convert (subclasses included).  ``None`` (default): ``nn.Linear``,
        ``nn.MultiheadAttention`` (its ``in_proj_weight`` per q/k/v chunk) and Hugging Face's
        ``Conv1D`` (weight stored (in, out); the string ``"Conv1D"`` selects it by name).  Add
        ``nn.Conv1d``, ``nn.Conv2d`` (e.g. a ViT patch embedding) or ``nn.ConvTranspose2d``
        (normalised along its output channels, dim 1) on request.
    exclude : iterable of str or callable
        Qualified module names or ``fnmatch`` patterns to skip (e.g. ``["head", "*.out_proj"]``),
        or a predicate ``exclude(name, module) -> bool``.
    split_qkv : bool
        ``True`` (default): a fused q/k/v projection (last name component in
        ``QKV_NAMES``: ``c_attn``, ``qkv``, ``Wqkv``, ``qkv_proj``; output size 3x (or 2x: k/v)
        its input size) gets one σ and γ per q, k, v block, as ``nn.MultiheadAttention``
        (the bound :math:`\\lVert\\hat W_K\\hat W_Q^\\top\\rVert_2 \\le \\gamma_K\\gamma_Q` then holds per
        block).  ``False``: one σ and γ for the fused matrix.  A fused projection whose rows interleave q, k and v
        per head (``INTERLEAVED_QKV_NAMES``: GPT-NeoX/BLOOM/Falcon ``query_key_value``) is never
        split (row blocks would mix q, k and v); the report gives each single σ its reason.
    batched : bool
        ``True`` (default): :func:`batch_power_iterations` on ``model`` (the cheap path; same
        values).  ``False``: each weight steps on its own.
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
    if isinstance(layer_types, (type, str)):  # one class (or "Conv1D") on its own
        layer_types = (layer_types,)
    try:
        layer_types = _default_layer_types() if layer_types is None else tuple(layer_types)
    except TypeError:
        raise TypeError(f"layer_types must be a module class or a tuple of them (or \"Conv1D\"), "
                        f"got {layer_types!r}") from None
    if not layer_types or not all(isinstance(t, type) or t == "Conv1D" for t in layer_types):
        raise TypeError('layer_types must be a non-empty tuple of module classes (or "Conv1D")')
    if not isinstance(split_qkv, bool):
        raise TypeError(f"split_qkv must be a bool, got {type(split_qkv).__name__}")
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be a bool, got {type(batched).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not callable(exclude):
        exclude = tuple(exclude)
    owners: dict[int, list[str]] = {}
    for qualname, module in model.named_modules(remove_duplicate=False):
        for name, t in module._parameters.items():
            if t is not None:
                owners.setdefault(id(t), []).append(f"{qualname}.{name}" if qualname else name)
    report = []
    lookups: set[str] = set()  # weights of lookup tables (no attention-module warning)
    for qualname, module in list(model.named_modules()):
        names = _weight_names(module)
        if not names:
            continue
        kind = parametrize.type_before_parametrizations(module).__name__
        wanted = _matches_type(module, layer_types)
        excluded = wanted and _excluded(exclude, qualname, module)
        if isinstance(module, nn.MultiheadAttention):
            names = [n for n in names if n.endswith("_weight") or n == "in_proj_weight"]
        elif wanted:
            names = [n for n in names if n == "weight"] + [n for n in names if n != "weight"]
        for name in names:
            full = f"{qualname}.{name}" if qualname else name
            entry = {"name": full, "module": kind, "converted": False, "chunks": 1, "reason": ""}
            report.append(entry)
            if _find(module, name) is not None:
                p = _find(module, name)
                entry.update(converted=True, chunks=p.n_chunks, reason="already sigma_reparam")
                continue
            if not wanted:
                entry["reason"] = f"{kind} is not in layer_types"
                if isinstance(module, LOOKUP_TYPES):
                    entry["reason"] += " (a lookup table, not a projection)"
                    lookups.add(full)
                continue
            if name != "weight" and not isinstance(module, nn.MultiheadAttention):
                entry["reason"] = "not the layer's weight"
                continue
            if excluded:
                entry["reason"] = "excluded"
                continue
            shared = owners.get(id(getattr(module, name)), [full])
            if len(shared) > 1:
                entry["reason"] = "tied to " + ", ".join(s for s in shared if s != full)
                warnings.warn(
                    f"convert_to_sigma_reparam: {full} is shared with {entry['reason'][8:]} (tied "
                    f"weights); left without sigmaReparam (reparametrising it in one place would "
                    f"change the other)", stacklevel=2)
                continue
            n_chunks = None
            leaf = qualname.rsplit(".", 1)[-1]
            if not isinstance(module, nn.MultiheadAttention):
                entry["reason"] = _fused_qkv_reason(leaf, split_qkv)
            if split_qkv and leaf in QKV_NAMES and not isinstance(module, nn.MultiheadAttention):
                w = getattr(module, name)
                out = w.shape[_output_dim(module, name)]
                inp = w.numel() // out
                if out == 3 * inp or out == 2 * inp:
                    n_chunks = out // inp
                else:
                    entry["reason"] = "fused q/k/v of unequal block sizes: one sigma for the whole matrix; "
            sigma_reparam(module, name, n_chunks=n_chunks, label=full, **opts)
            p = _find(module, name)
            entry.update(converted=True, chunks=p.n_chunks,
                         reason=entry["reason"] + ("q/k/v blocks" if p.n_chunks > 1 else ""))
    model.__dict__["_sigma_report"] = report
    install_hf_io(model)  # save_pretrained / load_state_dict of transformers' legacy keys (reparam_io)
    _warn_unconverted_attention(model, [e for e in report if e["name"] not in lookups])
    if batched:
        batch_power_iterations(model)
    else:
        scope_sigma_reparam(model)
    return model


def _warn_unconverted_attention(model: nn.Module, report: list[dict]) -> None:
    missed = {e["name"]: e["reason"] for e in report
              if not e["converted"] and e["reason"] != "excluded"}
    if not missed:
        return
    for qualname, module in model.named_modules():
        kind = parametrize.type_before_parametrizations(module).__name__.lower()
        if not isinstance(module, nn.MultiheadAttention) and not any(h in kind for h in ATTENTION_HINTS):
            continue
        prefix = f"{qualname}." if qualname else ""
        inside = {n: r for n, r in missed.items() if n.startswith(prefix)}
        if inside:
            detail = "; ".join(f"{n} ({r})" for n, r in inside.items())
            warnings.warn(f"convert_to_sigma_reparam: attention module {qualname or type(module).__name__} "
                          f"keeps weights without sigmaReparam: {detail}", stacklevel=3)
            for n in inside:
                missed.pop(n)


def sigma_reparam_report(model: nn.Module) -> list[dict]:
    """What the last :func:`convert_to_sigma_reparam` of ``model`` did, one dict per weight.

    Keys: ``name`` (qualified weight name), ``module`` (its class), ``converted`` (bool),
    ``chunks`` (σ/γ blocks: 3 for split q/k/v), ``reason`` (why skipped, or a note).

    >>> net = convert_to_sigma_reparam(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1)))
    >>> [(e["name"], e["converted"], e["reason"]) for e in sigma_reparam_report(net)]
    [('0.weight', True, ''), ('1.weight', False, 'Conv1d is not in layer_types')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = model.__dict__.get("_sigma_report")
    if report is None:
        raise ValueError("model: convert_to_sigma_reparam has not been called on this model")
    return [dict(e) for e in report]


def _batched_pre_hook(model: nn.Module, args) -> None:
    """Forward pre-hook of :func:`batch_power_iterations`: one step per group of equal shapes.
    (Under torch.compile: each weight steps at its first read, in the graph.)"""
    if _compiling():
        _enter_compiled_scope(model, _batched_pre_hook)
        return
    _enter_scope()
    try:
        _batched_steps(model)
    except BaseException:
        _exit_scope()
        raise


def _batched_steps(model: nn.Module) -> None:
    if not torch.is_grad_enabled() or _compiling():
        return
    if _in_backward():  # activation checkpointing recomputing the model: the reads reuse its steps
        return
    scope = _SCOPE
    flags = model.__dict__.get("_sigma_nonfinite_flags")
    if flags:  # accelerators: the finiteness flags of the previous batched forward
        for flag, labels in flags.values():
            if bool(flag.any()):
                raise _nonfinite_error(labels[int(flag.to(torch.uint8).argmax())])
    pending = model.__dict__.setdefault("_sigma_pending", [])
    groups: dict[tuple, list[tuple[SigmaReparam, torch.Tensor, torch.Tensor]]] = {}
    dtensor, fsdp_module = _sharding_types()
    for plist in model.modules():
        if fsdp_module is not None and plist is not model and isinstance(plist, fsdp_module):
            _hook_sharded_unit(model, plist)
        if not isinstance(plist, parametrize.ParametrizationList) or not hasattr(plist, "original"):
            continue
        p = plist[0]  # only a first parametrization sees the raw weight
        if not isinstance(p, SigmaReparam) or not p.training or p._batched_step is not None:
            continue
        weight = plist.original
        if dtensor is not None and isinstance(weight, dtensor):
            continue  # a shard (FSDP2 gathers it in its unit's pre-forward): stepped there
        last = p._last
        if last is not None and last.epoch == scope.epoch and last.key == p._key(weight):
            continue  # already stepped in this forward (read before this hook ran)
        W = p._as_matrices(weight.detach())  # (c, m, n)
        dtype = _compute_dtype(weight.dtype)
        key = (W.shape[1:], dtype, W.device, p.n_power_iterations, p.eps)
        groups.setdefault(key, []).append((p, _cast(W, dtype), weight))
    for (_, dtype, device, n_steps, eps), members in groups.items():
        params = [p for p, _, _ in members]
        sizes = [p.n_chunks for p in params]
        with torch.no_grad():
            if len(members) == 1:  # nothing to batch: the weight's own step, no stacking
                p, W, _ = members[0]
                u, v, sigma = _power_steps(W, _cast(p._v, dtype), _cast(p._u, dtype), n_steps, eps)
                us, vs, sigmas = (u,), (v,), (sigma,)
                p._commit(u, v)
            else:
                u0 = torch.cat([_cast(p._v, dtype) for p in params])  # (sum c, n)
                v0 = torch.cat([_cast(p._u, dtype) for p in params])  # (sum c, m)
                stack = model.__dict__.get("_sigma_stack")
                if stack is None:
                    stack = device.type != "cpu"
                u, v, sigma = _batched_power_steps([W for _, W, _ in members], u0, v0, n_steps,
                                                   eps, stack)
                us, vs, sigmas = u.split(sizes), v.split(sizes), sigma.split(sizes)
                torch._foreach_copy_([p._v for p in params], list(us))
                torch._foreach_copy_([p._u for p in params], list(vs))
        steps = []
        for p, ui, vi, si, (_, _, w) in zip(params, us, vs, sigmas, members):
            steps.append(_Step(p._key(w), scope.epoch, ui, vi, si))  # every read of this forward
            _set(p, "_peek", None)
            _set(p, "_last", steps[-1])
            _set(p, "_batched_step", (ui, vi, si, None, None))
        pending.extend(params)
        _check_group(model, params, sigmas, sigma)
        sources = [w for _, _, w in members]
        if (len(members) > 1 and all(w.ndim == 2 and w.dtype == dtype for w in sources)
                and all(p.dim == 0 for p in params) and not torch.is_autocast_enabled(device.type)):
            # W_hat of the whole group in one autograd node (one closed-form backward)
            gammas = [p.gamma for p in params]
            outs = _GroupScaleBySigma.apply(eps, tuple(sizes), len(params), *sources, *gammas, u, v, sigma)
            for p, ui, vi, si, out, w, step in zip(params, us, vs, sigmas, outs, sources, steps):
                _set(p, "_batched_step", (ui, vi, si, out, w))
                step.keep(out, True)


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """``weight``, gathered when it is a DTensor (an FSDP2 shard: a collective over its mesh)."""
    dtensor, _ = _sharding_types()
    if dtensor is not None and isinstance(weight, dtensor):
        return weight.full_tensor()
    return weight


def _sharding_types():
    """``(DTensor, FSDPModule)`` classes, or ``(None, None)`` without ``torch.distributed``
    (imported on first use only)."""
    cached = _SHARDING_TYPES
    if not cached:
        try:
            from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
            from torch.distributed.tensor import DTensor  # noqa: PLC0415
            cached.extend((DTensor, FSDPModule))
        except ImportError:  # a build without torch.distributed
            cached.extend((None, None))
    return cached[0], cached[1]


_SHARDING_TYPES: list = []


def _hook_sharded_unit(model: nn.Module, unit: nn.Module) -> None:
    """Give an FSDP2 unit inside ``model`` the hooks of :func:`batch_power_iterations`.

    ``fully_shard`` gathers a unit's parameters in the unit's own forward pre-hook (registered
    first, so it runs before this one): at the root's start its weights are shards, which the
    root's hook skips, and this unit's hook steps them batched once they are whole."""
    if any(fn is _batched_pre_hook for fn in unit._forward_pre_hooks.values()):
        return
    unit.__dict__["_sigma_stack"] = model.__dict__.get("_sigma_stack")
    unit.register_forward_pre_hook(_batched_pre_hook)
    unit.register_forward_hook(_batched_post_hook, always_call=True)


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
        _exit_compiled_scope(model, _batched_pre_hook)
        return
    _exit_scope()
    pending = model.__dict__.get("_sigma_pending")
    while pending:
        _set(pending.pop(), "_batched_step", None)


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
        _set(p, "_batched_step", None)
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
    under ``torch.compile`` the hooks only mark the forward (each weight takes its own step in
    the graph, at its first read; docs/reparam.md, "torch.compile").
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
    had = _remove_batch_hooks(model)
    if enabled:
        _remove_weight_cache_hooks(model)  # (the batched hooks scope the forward themselves)
        model.__dict__["_sigma_stack"] = stack
        model.register_forward_pre_hook(_batched_pre_hook)
        model.register_forward_hook(_batched_post_hook, always_call=True)
    elif had:
        scope_sigma_reparam(model)  # each weight steps on its own, still once per forward
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
    Other parametrizations stacked on the same tensor are folded as well.  A model sharded
    by FSDP2 is refused (``ValueError``): gather a full state dict
    (``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))``), load it
    into an unsharded converted model, and fold that.

    >>> net = convert_to_sigma_reparam(nn.Sequential(nn.Linear(3, 3)), gamma_init="one").eval()
    >>> x = torch.randn(2, 3)
    >>> y = net(x)
    >>> torch.equal(fold_sigma_reparam(net)(x), y), is_sigma_reparametrized(net[0])
    (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    dtensor, _ = _sharding_types()
    for qualname, module, name, _ in _sigma_modules(model):
        if dtensor is not None and isinstance(module.parametrizations[name].original, dtensor):
            raise ValueError(
                f"model: {qualname}.{name} is sharded (FSDP2 fully_shard / DTensor); fold a whole "
                f"copy instead: sd = torch.distributed.checkpoint.state_dict.get_model_state_dict("
                f"model, options=StateDictOptions(full_state_dict=True)), then load sd into the "
                f"unsharded, converted model and fold that (docs/distributed.md)")
    owners: dict[int, int] = {}
    for module in model.modules():
        for t in module._parameters.values():
            if t is not None:
                owners[id(t)] = owners.get(id(t), 0) + 1
    for qualname, module, name, _ in list(_sigma_modules(model)):
        _private_class(module)  # (a deepcopy may share the class: removal edits the class)
        plist = module.parametrizations[name]
        modes = [m.training for m in plist.modules()]
        plist.eval()  # the value an eval forward uses (a training-mode read would preview a step)
        original = plist.original
        if owners.get(id(original), 0) > 1:  # tied: keep the other users' weight as it is
            W_hat = getattr(module, name).detach().clone()
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            setattr(module, name, nn.Parameter(W_hat, requires_grad=original.requires_grad))
            warnings.warn(f"fold_sigma_reparam: {qualname}.{name} was tied to another module's "
                          f"weight; it now has a weight of its own (the tie is broken, the other "
                          f"module keeps the raw weight)", stacklevel=3)
        else:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        for m, mode in zip(plist.modules(), modes):
            m.training = mode
    for module in model.modules():
        _remove_batch_hooks(module)
        _remove_weight_cache_hooks(module)
    uninstall_hf_io(model)
    return model


@torch.no_grad()
def sigma_reparam_state(model: nn.Module) -> dict[str, dict[str, float]]:
    r"""Current σ estimate :math:`v^\top W u` and γ of every σReparam weight, for logging.

    Keys are qualified weight names (``"blocks.0.attn.q.weight"``); a fused q/k/v projection
    gives one entry per chunk (``"attn.in_proj_weight.q"``, ``.k``, ``.v``).  Reading the
    state never advances the power iteration.  On a model sharded by FSDP2 (``fully_shard``)
    each weight is gathered (``DTensor.full_tensor``, a collective): call it on every rank;
    every rank gets the σ of the whole weights.

    >>> net = nn.Sequential(SigmaReparamLinear(4, 4, gamma_init="one"))
    >>> sigma_reparam_state(net)["0.weight"]["gamma"]
    1.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state: dict[str, dict[str, float]] = {}
    for qualname, module, name, p in _sigma_modules(model):
        key = f"{qualname}.{name}" if qualname else name
        sigma = p.sigma(_whole(module.parametrizations[name].original)).tolist()
        gamma = _whole(p.gamma.detach()).reshape(-1).tolist()
        if p.n_chunks == 1:
            state[key] = {"sigma": sigma[0], "gamma": gamma[0]}
        else:
            labels = QKV_CHUNKS if p.n_chunks == 3 else [str(i) for i in range(p.n_chunks)]
            for label, s, g in zip(labels, sigma, gamma):
                state[f"{key}.{label}"] = {"sigma": s, "gamma": g}
    return state


from .reparam_io import (  # noqa: E402  (uses this module)
    install_hf_io, load_sigma_reparam, refuse_plain_hf_save, save_sigma_reparam, uninstall_hf_io,
)
