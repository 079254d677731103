"""Training loop for every model (GPT, ViT, seq2seq), with attention entropy and sigma logged.

:class:`Trainer` owns everything a run's state consists of (model, optimiser, the data
order's :class:`torch.Generator`, the step counter) and writes a run directory.  ``cfg.model``
picks the model and its task (:mod:`sigma_core.experiments.tasks`): ``"gpt"`` on the stdlib
bytes, ``"vit"`` on scikit-learn's 8x8 digits, ``"seq2seq"`` on synthetic sequence reversal.

- ``config.json``: the full :class:`~sigma_core.experiments.config.TrainConfig` (``model``,
  ``norm``, ``optimizer``, ``warmup_steps``, ``weight_decay``, ``reparam``, ...) plus provenance
  (git commit and ``git_dirty``, package versions, device name, the data's SHA-256 and size);
- ``metrics.jsonl``: one JSON record per logged step, appended and flushed as it is written;
- ``samples/step_NNNNNN.npz``: per attention row of a fixed held-out batch, the measured entropy,
  the centred logit norm, the number of visible keys T_i and the theorem's sigma-bold
  (theory/README.md eq. (1)), for the confirmation figure of :mod:`sigma_core.experiments.report`;
- ``checkpoint.pt``: model, optimiser, data-order and RNG state, written atomically every
  ``checkpoint_every`` steps and at the end; :meth:`Trainer.resume` continues from it so that the
  continued ``metrics.jsonl`` equals an uninterrupted run's (on the CPU: bit for bit, apart from
  the wall-clock fields ``train_time_s`` and ``tokens_per_s``);
- ``summary.json``: the final numbers, with ``diverged`` (bool) and ``diverged_step``.

Faults: SIGINT/SIGTERM finish the current step, write the checkpoint and raise
:class:`TrainingInterrupted`; a non-finite loss or gradient stops the run before the optimiser
step, keeps the last good checkpoint and appends ``{"step": N, "diverged": true, ...}`` to the
metrics (divergence is a result, so :meth:`Trainer.run` returns normally); a truncated,
corrupted or incompatible checkpoint raises :class:`CheckpointError` saying which.  Under
``torchrun`` the model is wrapped in DistributedDataParallel (see :mod:`sigma_core.experiments.distributed`).

Optimisation: AdamW or SGD (``cfg.optimizer``), linear warm-up over ``cfg.warmup_steps`` and a
constant or cosine schedule (:func:`learning_rate`), bf16 autocast on CUDA.  The GPT presets
keep AdamW betas (0.9, 0.95), no weight decay, no warm-up and a constant learning rate.

Provenance: a run written into the checkout's ``results/`` folder from a checkout whose tracked
files differ from the commit is refused (:class:`DirtyTreeError`) unless ``allow_dirty=True``,
which warns (:class:`DirtyTreeWarning`) and marks ``git_dirty: true`` in ``config.json`` and
``summary.json``; results are meant to come from a commit that reproduces them.

Example
-------
>>> import tempfile
>>> from sigma_core.experiments.config import preset
>>> with tempfile.TemporaryDirectory() as out:
...     summary = Trainer(preset("cpu-smoke", steps=4, log_every=2, eval_every=4), out).run()
>>> summary["steps"], summary["bound_violations"]
(4, 0)
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import pickle
import platform
import signal
import subprocess
import threading
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from sigma_core.experiments import distributed
from sigma_core.experiments.config import TrainConfig
from sigma_core.experiments.data import Corpus
from sigma_core.experiments.tasks import make_task
from sigma_core.entropy import VARIANTS, attention_row_stats, bound_variant_norms, head_sigma
from sigma_core.models import gpt as gpt_model
from sigma_core.models.gpt import GPT, apply_reparam
from sigma_core.monitor import EntropyMonitor
from theory import entropy_lower_bound

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
SUMMARY_NAME = "summary.json"
#: fields that may change on resume (they do not change the trajectory's numbers on one device)
RUNTIME_FIELDS = ("device", "compile", "compile_backend", "distributed", "threads", "progress", "checkpoint_every")
#: what a training checkpoint holds (``cuda_rng`` too when it was written on CUDA)
STATE_KEYS = ("config", "step", "model", "optimizer", "data_generator", "torch_rng", "train_time",
              "tokens_seen", "corpus_sha256")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, truncated/corrupted, or of another config."""


class TooLargeError(ValueError):
    """A config whose steps cannot fit in this machine's memory (refused before anything runs)."""


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(cfg, memory: int | None = None) -> None:
    """Refuse (:class:`TooLargeError`, naming ``block_size``) a GPT config whose logged steps form
    one float32 attention map larger than ``memory`` (default: this machine's physical memory).

    The recorded steps check every attention row against the bound on the map ``batch_size x
    n_head x T x T`` (T = ``block_size``); where that alone exceeds the memory, the first step
    would run for minutes and then fail (``block_size`` 100 000: 80 GB for one sequence of two
    heads), so it is refused up front.

    >>> from sigma_core.experiments.config import preset
    >>> check_fits_in_memory(preset("cpu-smoke"), memory=2**30)  # 8 x 2 x 32 x 32 floats: fits
    >>> check_fits_in_memory(preset("cpu-smoke", block_size=100_000, batch_size=1),
    ...                      memory=24 * 2**30)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    sigma_core.experiments.train.TooLargeError: block_size (100000) is too large for this machine: ...
    """
    if getattr(cfg, "model", "gpt") != "gpt":
        return
    memory = physical_memory_bytes() if memory is None else memory
    need = 4 * cfg.batch_size * cfg.n_head * cfg.block_size ** 2
    if memory is not None and need > memory:
        raise TooLargeError(
            f"block_size ({cfg.block_size}) is too large for this machine: the recorded steps form an attention "
            f"map of batch_size x n_head x block_size^2 = {cfg.batch_size} x {cfg.n_head} x {cfg.block_size}^2 "
            f"float32 values, {need / 2**30:.1f} GiB, and the machine has {memory / 2**30:.1f} GiB")


class CompileBackendError(ValueError):
    """A ``compile_backend`` that cannot compile here (not registered, or inductor on a CPU without
    a C++ compiler), refused before anything runs."""


class DirtyTreeError(ValueError):
    """A run into the checkout's ``results/`` from uncommitted code (pass ``allow_dirty`` to mark it instead)."""


class DirtyTreeWarning(UserWarning):
    """A run was written from a checkout whose tracked files differ from its commit."""


class TrainingInterrupted(RuntimeError):
    """Raised by :meth:`Trainer.run` after a SIGINT/SIGTERM once the step, checkpoint and metrics
    are written; ``signum``, ``step`` and ``run_dir`` say what happened and where to resume."""

    def __init__(self, signum: int, step: int, run_dir: Path | None):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        where = (f"checkpoint written to {run_dir / CHECKPOINT_NAME}; resume with: "
                 f"entropy-collapse train --resume {run_dir}") if run_dir is not None else "no run directory"
        super().__init__(f"interrupted by {name} after step {step}; {where}")


class TrainingAborted(TrainingInterrupted):
    """Raised by :meth:`Trainer.run` when a SIGINT/SIGTERM came during a step that did not finish
    within :attr:`Trainer.stop_timeout` seconds, or a second signal came: the step in progress
    was abandoned and nothing of it written, so the folder holds what it held after the last
    checkpoint (``checkpoint_step``; None when none was written yet) and ``resume`` continues from
    there."""

    def __init__(self, signum: int, step: int, run_dir: Path | None, checkpoint_step: int | None):
        self.signum, self.step, self.run_dir, self.checkpoint_step = signum, step, run_dir, checkpoint_step
        RuntimeError.__init__(self, abort_message(signum, step, run_dir, checkpoint_step))


def abort_message(signum: int, step: int, run_dir: Path | None, checkpoint_step: int | None) -> str:
    """What :class:`TrainingAborted` says: which step was abandoned and what is left on disk."""
    head = f"interrupted by {signal.Signals(signum).name} during step {step}, which was abandoned"
    if run_dir is None:
        return head + "; nothing was written"
    if checkpoint_step is None:
        return (head + f"; no checkpoint was written yet: start it again with: "
                f"entropy-collapse train --restart {run_dir}")
    return (head + f"; the checkpoint of step {checkpoint_step} in {run_dir / CHECKPOINT_NAME} is intact: "
            f"resume with: entropy-collapse train --resume {run_dir}")


class _StepAborted(KeyboardInterrupt):
    """Raised out of a step by the signal handler (a KeyboardInterrupt, so that no ``except
    Exception`` on the way, e.g. around the kernel build, swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: seconds a step may still take after SIGINT/SIGTERM before it is abandoned (:attr:`Trainer.stop_timeout`)
STOP_TIMEOUT_S = 10.0
#: seconds after the step was told to stop before the process exits, when it is stuck in one
#: long operation that no Python signal handler can interrupt (only with :attr:`Trainer.exit_when_stuck`)
STUCK_EXIT_S = 2.0


class Diverged(FloatingPointError):
    """A non-finite loss or gradient at ``step`` (raised by :meth:`Trainer.train_step` before the
    optimiser step, so the parameters stay those of the last good step)."""

    def __init__(self, step: int, reason: str, loss: float | None = None, grad_norm: float | None = None):
        self.step, self.reason, self.loss, self.grad_norm = step, reason, loss, grad_norm
        super().__init__(f"training diverged at step {step}: {reason}")


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


#: dense bf16 peak of the GPUs we know, for model FLOP utilisation (FLOP/s)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def git_state() -> tuple[str | None, str, bool]:
    """``(top-level directory, HEAD commit, dirty)`` of the checkout holding this code, or
    ``(None, "unknown", False)`` outside git.  Dirty: a tracked file differs from the commit."""
    here = Path(__file__).resolve().parent
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        top, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD")
        return top, head, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, "unknown", False


def git_commit() -> str:
    """The checkout's HEAD commit (with ``-dirty`` when files differ), or ``"unknown"``."""
    _, head, dirty = git_state()
    return head + ("-dirty" if dirty else "")


def check_clean_tree(out_dir: str | os.PathLike | None, *, allow_dirty: bool = False) -> bool:
    """Refuse (:class:`DirtyTreeError`) a run into the checkout's ``results/`` from a dirty tree.

    Returns whether the tree is dirty.  With ``allow_dirty`` a dirty run into ``results/`` only
    warns (:class:`DirtyTreeWarning`); runs elsewhere are never refused.
    """
    top, head, dirty = git_state()
    if not dirty or out_dir is None or top is None:
        return dirty
    results = (Path(top) / "results").resolve()
    target = Path(out_dir).resolve()
    if target == results or results in target.parents:
        msg = (f"out_dir {out_dir} lies in {results}, but tracked files of the checkout differ from "
               f"commit {head[:12]}: commit first (results must come from a clean commit)")
        if not allow_dirty:
            raise DirtyTreeError(msg + ", or pass allow_dirty / --allow-dirty to write a run marked dirty")
        warnings.warn(msg + "; writing it marked git_dirty", DirtyTreeWarning, stacklevel=3)
    return dirty


def check_compile_backend(backend: str, device: torch.device) -> None:
    """Refuse (:class:`CompileBackendError`, naming ``compile_backend``) a ``torch.compile``
    backend that is not registered, or ``"inductor"`` on the CPU without a working C++ compiler,
    before any step runs (``torch.compile`` is lazy: it would fail at the first compiled step).

    >>> check_compile_backend("aot_eager", torch.device("cpu"))
    >>> check_compile_backend("no-such-backend", torch.device("cpu"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    sigma_core.experiments.train.CompileBackendError: compile_backend must be a registered torch.compile backend, ..., got 'no-such-backend'
    """
    from torch._dynamo import list_backends  # noqa: PLC0415 (only when compiling: its import takes seconds)

    known = list_backends(exclude_tags=())  # the debug backends (aot_eager, eager) too
    if backend not in known:
        raise CompileBackendError(f"compile_backend must be a registered torch.compile backend, such as "
                                  f"'inductor', 'aot_eager' or 'eager' (torch._dynamo.list_backends(exclude_tags=()) "
                                  f"lists all {len(known)} here), got {backend!r}")
    if backend == "inductor" and device.type == "cpu":
        try:  # inductor's own search (torch._inductor.config.cpp.cxx, the CXX variable)
            from torch._inductor.cpp_builder import get_cpp_compiler  # noqa: PLC0415
            from torch._inductor.exc import InvalidCxxCompiler  # noqa: PLC0415
        except ImportError:  # another torch layout: inductor reports it at the first compiled step
            return
        try:
            get_cpp_compiler()
        except InvalidCxxCompiler as exc:
            raise CompileBackendError(
                f"compile_backend ('inductor') generates C++ on the CPU and needs a C++ compiler, and none "
                f"works here ({exc}): install one (g++) or set CXX, or choose the backend 'aot_eager'") from None


def build_model(cfg) -> torch.nn.Module:
    """The model of ``cfg.model`` (``"gpt"``, ``"vit"``, ``"seq2seq"``), reparametrised as
    ``cfg.reparam`` says (the ViT's patch-embedding convolution included)."""
    if cfg.model == "gpt":
        return gpt_model.build_model(cfg)
    if cfg.model == "vit":
        from sigma_core.models.vit import build_vit  # noqa: PLC0415

        return apply_reparam(build_vit(cfg), cfg.reparam, gamma_init=cfg.gamma_init,
                             layer_types=(torch.nn.Linear, torch.nn.Conv2d))
    if cfg.model == "seq2seq":
        from sigma_core.models.seq2seq import build_seq2seq  # noqa: PLC0415

        return apply_reparam(build_seq2seq(cfg), cfg.reparam, gamma_init=cfg.gamma_init)
    if cfg.model == "speech":
        from sigma_core.models.speech import build_speech  # noqa: PLC0415

        return apply_reparam(build_speech(cfg), cfg.reparam, gamma_init=cfg.gamma_init)
    if cfg.model == "vit-simclr":
        from sigma_core.models.simclr import build_simclr_vit  # noqa: PLC0415

        return apply_reparam(build_simclr_vit(cfg), cfg.reparam, gamma_init=cfg.gamma_init,
                             layer_types=(torch.nn.Linear, torch.nn.Conv2d))
    raise ValueError(f"cfg.model must be 'gpt', 'vit', 'seq2seq', 'speech' or 'vit-simclr', got {cfg.model!r}")


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (``betas``) or SGD (``momentum``; 0 is plain SGD) with ``weight_decay`` on every parameter."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"cfg.optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")


def learning_rate(cfg, step: int) -> float:
    """The learning rate of optimiser step ``step`` (1-based): ``lr * min(1, step / warmup_steps)``
    times 1 (``"constant"``) or ``(1 + cos(pi * step / steps)) / 2`` (``"cosine"``)."""
    factor = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return cfg.lr * factor


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "entropy-collapse"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    """Human-readable accelerator or CPU name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token, 6N + 12·L·T·d (PaLM appendix B; nanoGPT ``estimate_mfu``) for
    the GPT; 6N (the attention term left out) for the other models."""
    if not isinstance(model, GPT):
        return 6.0 * sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.block_size * cfg.d_model


#: first bytes of a checkpoint file: the format, then the sha256 of the payload (the bytes after
#: the header line), checked before anything is unpickled
CHECKPOINT_MAGIC = b"entropy-collapse checkpoint v2 sha256="


def checkpoint_bytes(obj) -> bytes:
    """``obj`` as a checkpoint file's bytes: :data:`CHECKPOINT_MAGIC`, the hex sha256 of the
    payload and a newline, then the payload (``torch.save`` of ``obj``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.tmpPID`` files beside ``path`` left by a writer that was killed mid-write
    (its process no longer exists); returns what was removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or tmp.is_symlink() or not tmp.is_file():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # a live process is writing it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as a checksummed checkpoint (:func:`checkpoint_bytes`) to a temporary file
    beside ``path``, then ``os.replace`` it into place; stale temporaries of killed writers are
    removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    data = checkpoint_bytes(obj)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class RunFolderError(ValueError):
    """A write the run folder does not allow: through a symbolic link (it could land outside the
    folder, or on a file the run did not create)."""


def check_no_links(folder: str | os.PathLike, names) -> None:
    """Raise :class:`RunFolderError` when one of ``folder/NAME`` (``names``) is a symbolic link, or
    ``folder`` itself resolves elsewhere through one of ``names``: no write of a run follows a
    link out of its folder."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); the run writes only "
                                 f"inside its folder: remove the link")


#: the files a training run writes into its folder (and may replace when it is run again)
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, CONFIG_NAME, SUMMARY_NAME, "error.txt")


def clear_run_dir(run_dir: str | os.PathLike) -> None:
    """Remove what a training run wrote into ``run_dir`` (:data:`RUN_FILES`, ``samples/step_*.npz``)
    so that it can be trained again; :class:`RunFolderError`, deleting nothing, when the folder
    holds anything else (a user's file) or a link."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    ours = [run_dir / n for n in RUN_FILES if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    samples = run_dir / "samples"
    sample_files = sorted(samples.glob("step_*.npz")) if samples.is_dir() and not samples.is_symlink() else []
    other = [p for p in run_dir.iterdir() if p not in ours and p != samples]
    if samples.is_dir() and not samples.is_symlink():
        other += [p for p in samples.iterdir() if p not in sample_files]
    elif samples.exists() or samples.is_symlink():
        other.append(samples)
    links = [p for p in ours + sample_files if p.is_symlink()]
    if other or links:
        names = ", ".join(str(p) for p in (other + links)[:5])
        raise RunFolderError(f"{run_dir} holds files a training run did not write ({names}); nothing was "
                             f"deleted: move them, or choose another output folder")
    for p in ours + sample_files:
        p.unlink()
    if samples.is_dir():
        samples.rmdir()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


#: absolute slack (nats) when comparing a measured float32 entropy with the float64 bound
ENTROPY_ATOL = 1e-4


@torch.no_grad()
def row_samples(model: torch.nn.Module, *inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Every attention row of ``model`` on ``inputs`` (GPT: tokens ``(B, T)``; ViT: images;
    seq2seq: source and target), against the bound of eq. (1).

    One float32 forward in eval mode (no power-iteration step) with hooks on the attention
    probes.  For each (layer, head, batch, query) row it returns flat arrays ``layer``, ``head``,
    ``n_keys`` (T_i), ``entropy`` (nats) and, for each variant of :data:`sigma_core.entropy.VARIANTS`
    (``theorem``: sigma_h ||X||_2^2 of eq. (1); ...; ``exact``: the measured centred logit norm),
    an upper bound on the row's centred logit norm.  ``violations`` counts rows whose entropy
    lies below ``h_{T_i}`` of any variant by more than :data:`ENTROPY_ATOL` (it must be 0).
    """
    was_training = model.training
    model.eval()
    seen: list[tuple] = []
    weights: list[tuple] = []

    def capture(attn):
        def hook(module, args, out):
            seen.append(args)
            # read inside the forward, where FSDP2 has gathered the block's weights
            weights.append(tuple(w.detach().clone() for w in attn.head_weights()))
        return hook

    hooks = [attn.probe.register_forward_hook(capture(attn)) for attn in model.attention_modules()]
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("layer", "head", "n_keys", "entropy", *VARIANTS)}
    for layer, (attn, (x, q, k, *rest), w_qk) in enumerate(zip(model.attention_modules(), seen, weights,
                                                              strict=True)):
        x_k = rest[0] if rest else None  # cross-attention: the key-side tokens
        # float64 statistics of the float32 queries and keys: the exact-row bound then holds to ~1e-12
        stats = attention_row_stats(q.double(), k.double(), scale=attn.scale, causal=attn.causal)  # (B, H, T)
        sigma = head_sigma(*w_qk, scale=attn.scale)  # (H,)
        if getattr(attn, "weight_bounds_valid", True):
            norms = bound_variant_norms(stats, sigma, x, x_k)  # {variant: (B, H, T)}
        else:  # QK-LayerNorm, cross-attention: weight variants do not apply (sigma_core.probe);
            norms = {v: stats.logit_norm.double() for v in VARIANTS}  # record the exact norm
        B, H, T = stats.entropy.shape
        cols["layer"].append(np.full(B * H * T, layer, dtype=np.int16))
        cols["head"].append(np.broadcast_to(np.arange(H, dtype=np.int16)[None, :, None], (B, H, T)).ravel())
        cols["n_keys"].append(stats.n_keys.cpu().numpy().astype(np.int32).ravel())
        cols["entropy"].append(stats.entropy.cpu().numpy().ravel())  # float64
        for v in VARIANTS:
            cols[v].append(norms[v].cpu().numpy().ravel())
    out = {k: np.concatenate(v) for k, v in cols.items()}
    bound = np.max([entropy_lower_bound(out[v], out["n_keys"], rounding="down") for v in VARIANTS], axis=0)
    out["violations"] = np.int64(np.count_nonzero(out["entropy"] < bound - ENTROPY_ATOL))
    return out


class _Lent:
    """A sink lent to one short-lived monitor: its records pass through, its ``close`` does not
    close the sink (the owner does, once, at the end of the run)."""

    def __init__(self, sink):
        self.sink = sink
        self.all_ranks = getattr(sink, "all_ranks", False)

    def write(self, records):
        self.sink.write(records)

    def close(self):
        pass


@contextmanager
def observed(model: GPT, enabled: bool = True, sinks=()):
    """Watch the next forwards of ``model`` with an :class:`~sigma_core.monitor.EntropyMonitor`.

    Yields the monitor (``None`` when not ``enabled``); turn it into a metrics record with
    :func:`attention_metrics`.  The monitor's hooks are removed on exit; ``sinks`` receive its
    records and stay open (their owner closes them).
    """
    if not enabled:
        yield None
        return
    monitor = EntropyMonitor(model, every=1, sinks=[_Lent(s) for s in sinks])
    try:
        yield monitor
    finally:
        monitor.close()


def attention_gammas(model: torch.nn.Module) -> dict:
    """sigmaReparam's gamma of each attention projection (gathered under FSDP2: every rank)."""
    from sigma_core.reparam import sigma_reparam_state  # noqa: PLC0415

    return {k: v["gamma"] for k, v in sigma_reparam_state(model).items() if ".attn." in k}


def attention_metrics(monitor: EntropyMonitor, model: GPT, *, gamma: dict | None = None) -> dict:
    """Per-step attention fields of ``metrics.jsonl`` from the monitor's last records.

    ``entropy[l][h]``: mean entropy of head h of layer l over rows with at least T/2 keys (so
    that the early causal rows, which see few keys, do not dominate); ``entropy_mean`` its mean
    over layers and heads;
    ``entropy_min_head`` its minimum over heads; ``entropy_min_row`` the lowest single row;
    ``sigma[l][h]`` = sigma_h (eq. (1), with the logit scale) and ``sigma_max`` its maximum;
    ``rows_checked`` and ``bound_violations`` (rows below any of the bounds h_{T_i}, eq. (2),
    summed over the variants; it must stay 0); ``rows_nonfinite``, only when some row that would be
    checked has a non-finite logit norm (a diverging run: those rows are left out of
    ``rows_checked``; every layer's record is still there); ``gamma``: sigmaReparam's gamma of
    each attention projection when the model is reparametrised (``gamma``: that dict, computed
    beforehand, e.g. on every rank of a sharded model).
    """
    recs = monitor.last
    if not recs:
        raise ValueError("monitor has no records: was the model run inside observed()?")
    n_layer, n_head = max(r["layer"] for r in recs) + 1, max(r["head"] for r in recs) + 1
    ent = np.full((n_layer, n_head), np.nan)
    sig = np.full((n_layer, n_head), np.nan)
    row_min, violations, rows, nonfinite = math.inf, 0, 0, 0
    for r in recs:
        e = r["entropy_mean_half"] if r["entropy_mean_half"] is not None else r["entropy_mean"]
        ent[r["layer"], r["head"]] = e
        sig[r["layer"], r["head"]] = r["sigma"]
        row_min = min(row_min, r["entropy_min"])
        violations += sum(r[f"violations_{v}"] or 0 for v in VARIANTS)
        rows += r["bound_rows"]
        nonfinite += r["rows_nonfinite"]
    out = {"entropy_mean": float(ent.mean()), "entropy_min_head": float(ent.min()),
           "entropy_min_row": float(row_min), "sigma_max": float(sig.max()),
           "rows_checked": int(rows), "bound_violations": int(violations),
           "entropy": ent.tolist(), "sigma": sig.tolist()}
    if nonfinite:  # rows whose logit norm overflowed (a diverging run): left out of the bound check
        out["rows_nonfinite"] = int(nonfinite)
    if gamma is not None:
        out["gamma"] = gamma
    elif any(True for _ in _sigma_state_names(model)):
        out["gamma"] = attention_gammas(model)
    return out


def _sigma_state_names(model: GPT):
    from sigma_core.reparam import SigmaReparam

    return (m for m in model.modules() if isinstance(m, SigmaReparam))


class Trainer:
    """One training run of the model of ``cfg.model`` under a :class:`TrainConfig`.

    Parameters
    ----------
    cfg : TrainConfig
        What to train and how.
    out_dir : path or None
        The run directory (created); ``None`` trains without writing anything.
    corpus : Corpus, optional
        Pre-loaded data of the GPT (default: :func:`~sigma_core.experiments.data.load_stdlib_corpus`
        of the config); the other models build their task from the config.
    allow_dirty : bool
        Write into the checkout's ``results/`` even from a dirty tree (warned and marked);
        by default that raises :class:`DirtyTreeError`.
    tensorboard : path or None
        Also write each logged step's attention records (scalars, and a layer x head entropy
        heatmap every 10th logged step: :class:`sigma_core.integrations.tensorboard.TensorBoardSink`)
        and its losses to TensorBoard event files in this folder (the ``tensorboard`` attribute;
        needs the ``tensorboard`` package; rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike | None = None, *,
                 corpus: Corpus | None = None, allow_dirty: bool = False,
                 tensorboard: str | os.PathLike | None = None):
        if tensorboard is not None and not isinstance(tensorboard, (str, os.PathLike)):
            raise TypeError(f"tensorboard must be a folder path or None, got {type(tensorboard).__name__}")
        self.tensorboard = None if tensorboard is None else Path(tensorboard)
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        cfg.validate()
        check_fits_in_memory(cfg)
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.git_dirty = check_clean_tree(self.out_dir, allow_dirty=allow_dirty)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        ddp_device = distributed.setup(cfg.device)
        self.rank, self.world_size = distributed.rank_and_world()
        self.is_main = self.rank == 0
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of "
                             f"processes ({self.world_size}): each rank trains on batch_size / N rows")
        self.device = ddp_device if ddp_device is not None else resolve_device(cfg.device)
        if cfg.compile:  # before anything is built: torch.compile would fail at the first compiled step
            check_compile_backend(cfg.compile_backend, self.device)
        self.task = make_task(cfg, corpus)
        self.corpus = getattr(self.task, "corpus", None)  # the GPT's bytes; None for other models
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        #: FSDP2: the model is sharded in place (fully_shard per block and at the root); every
        #: forward, the gathered state and the sigma/gamma read then need every rank
        self.sharded = self.world_size > 1 and cfg.distributed == "fsdp"
        if self.sharded and cfg.test_split:  # the test evaluation runs on the writer rank alone
            raise ValueError("test_split is not supported with distributed='fsdp' (every forward of a "
                             "sharded model needs every rank); run the test split in one process")
        if self.sharded:
            distributed.shard_model(self.model)
        self.optimizer = build_optimizer(self.model, cfg)  # (after sharding: the DTensor parameters)
        self.data_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.ddp = self.model
        if self.world_size > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

            # broadcast_buffers (default): sigmaReparam's u, v come from rank 0 at every forward
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        #: what the steps that are not recorded run: under FSDP2 the whole sharded model compiled
        #: (FSDP2's gather and reshard hooks stay outside the graph), under DDP the DDP module
        self.compiled = torch.compile(self.ddp, backend=cfg.compile_backend) if cfg.compile else self.ddp
        #: the compiled steps' dynamo recompile limit under FSDP2: the root's forward breaks the graph
        #: at FSDP2's hooks and each block's forward is compiled as a frame of its own, once per block
        #: (the parametrized layers of every block are classes of their own, torch.nn.utils.parametrize),
        #: so beyond torch's limit of 8 the remaining blocks would run uncompiled
        self._recompile_limit = None
        if cfg.compile and self.sharded:
            from torch._dynamo import config as dynamo_config  # noqa: PLC0415

            units = sum(1 for m in self.model.modules() if distributed.is_sharded_unit(m))
            self._recompile_limit = max(dynamo_config.recompile_limit, units + 8)
        self._stop_signal: int | None = None
        #: seconds a step may still take after SIGINT/SIGTERM before it is abandoned (None: no limit)
        self.stop_timeout: float | None = STOP_TIMEOUT_S
        #: exit the process (status 128 + signal) when the abandoned step is stuck in one operation
        #: STUCK_EXIT_S seconds later (the CLI sets it; a notebook's kernel must not exit)
        self.exit_when_stuck = False
        self._in_step = False  # in the part of a step that writes nothing (it may be abandoned)
        self._step_lock = threading.Lock()
        self._step_over = threading.Event()
        self._step_number = 0
        self._checkpoint_step: int | None = None  # the step of the last checkpoint in out_dir
        self.diverged: Diverged | None = None
        self._flops_per_token = flops_per_token(self.model)
        self._val_generator_seed = cfg.seed + 2
        self.summary: dict = {}
        self.last_val_accuracy: float | None = None

    # ------------------------------------------------------------------ state
    def autocast(self):
        """bf16 autocast on CUDA, nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: model, optimiser, data order, RNG.

        Under FSDP2 the model and optimizer state are gathered (every rank calls this) into the
        format of one process, so the file is the same whatever the world size."""
        if self.sharded:
            model_state = distributed.full_model_state(self.model)
            optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        return {"config": self.cfg.to_dict(), "step": self.step, "model": model_state,
                "optimizer": optimizer_state,
                "data_generator": self.data_generator.get_state(),
                "torch_rng": torch.get_rng_state(), "train_time": self.train_time,
                "tokens_seen": self.tokens_seen, "corpus_sha256": self.task.sha256,
                **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises :class:`CheckpointError` (a ``ValueError``) naming
        what is wrong when it is not a training state or belongs to another config or corpus.

        Fields of :data:`RUNTIME_FIELDS` (device, threads, ...) may differ; every other config
        field must be equal.
        """
        if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
            missing = sorted(set(STATE_KEYS) - set(state)) if isinstance(state, dict) else STATE_KEYS
            raise CheckpointError(f"not a training checkpoint: missing {list(missing)}")
        # a field the checkpoint predates holds its default value there
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.default is not dataclasses.MISSING}
        ours, theirs = self.cfg.to_dict(), {**defaults, **dict(state["config"])}
        diff = sorted(k for k in set(ours) | set(theirs)
                      if k not in RUNTIME_FIELDS and ours.get(k, "<absent>") != theirs.get(k, "<absent>"))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {theirs.get(k, '<absent>')!r} vs {ours.get(k, '<absent>')!r}"
                               for k in diff)
            raise CheckpointError(f"checkpoint config differs from this trainer's config ({detail})")
        if state["corpus_sha256"] != self.task.sha256:
            raise CheckpointError("checkpoint was trained on different data (corpus/data sha256 differs)")
        try:
            if self.sharded:
                distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint model/optimizer state does not fit this model: {exc}") from exc
        self.data_generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])
        self.train_time = float(state["train_time"])
        self.tokens_seen = int(state["tokens_seen"])

    @property
    def finished(self) -> bool:
        """Whether this trainer's run is complete in its folder: all ``cfg.steps`` taken and a
        readable ``summary.json`` written (then :meth:`run` changes nothing and returns it)."""
        if self.out_dir is None or self.step < self.cfg.steps:
            return False
        try:
            return isinstance(json.loads((self.out_dir / SUMMARY_NAME).read_text()), dict)
        except (OSError, ValueError):
            return False

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write :meth:`state_dict` atomically (default ``RUN_DIR/checkpoint.pt``)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / CHECKPOINT_NAME
        if self.sharded:  # gathered from every rank's shards; one writer
            state = self.state_dict()
            if self.is_main:
                atomic_torch_save(state, path)
        elif self.is_main:  # one writer; the state is the same on every rank
            atomic_torch_save(self.state_dict(), path)
        if self.out_dir is not None and Path(path) == self.out_dir / CHECKPOINT_NAME:
            self._checkpoint_step = self.step
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` into this trainer.

        Raises :class:`CheckpointError` when the file is missing, truncated or corrupted, or
        holds the state of another config.
        """
        self.load_state_dict(read_checkpoint(path))

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, corpus: Corpus | None = None, allow_dirty: bool = False,
               **runtime) -> "Trainer":
        """The trainer of the run in ``run_dir``, restored from its checkpoint.

        The config is the checkpoint's; ``runtime`` may change only :data:`RUNTIME_FIELDS`.
        Records of ``metrics.jsonl`` after the checkpoint's step (a killed run's, or a half-written
        last line) are dropped, so that continuing appends exactly what an uninterrupted run wrote.
        """
        run_dir = Path(run_dir)
        bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
        if bad:
            raise ValueError(f"only {RUNTIME_FIELDS} may change on resume, got {bad}")
        state = read_checkpoint(run_dir / CHECKPOINT_NAME)
        try:
            cfg = TrainConfig.from_dict({**state["config"], **runtime})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT_NAME} holds a config this version "
                                  f"cannot use: {exc}") from exc
        folder_config = run_dir / CONFIG_NAME
        if folder_config.is_file():  # the checkpoint must belong to the run of this folder
            try:
                stored = json.loads(folder_config.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{folder_config} is unreadable ({exc}); the checkpoint cannot be "
                                      f"matched to this folder's run") from exc
            if not isinstance(stored, dict):
                raise CheckpointError(f"{folder_config} does not hold a run config")
            theirs = dict(state["config"])
            diff = sorted(k for k in set(theirs) & set(stored)
                          if k not in RUNTIME_FIELDS and theirs[k] != stored[k])
            if diff:
                detail = ", ".join(f"{k}: checkpoint {theirs[k]!r} vs {CONFIG_NAME} {stored[k]!r}" for k in diff)
                raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT_NAME} does not belong to the run in "
                                      f"this folder ({detail}); nothing was changed")
        trainer = cls(cfg, run_dir, corpus=corpus, allow_dirty=allow_dirty)
        trainer.load_state_dict(state)
        trainer._checkpoint_step = trainer.step
        if trainer.finished:  # nothing to do: the folder stays as it is
            return trainer
        if trainer.is_main:
            truncate_metrics(run_dir / METRICS_NAME, trainer.step)
        return trainer

    # ------------------------------------------------------------------ steps
    def train_step(self, *, observe: bool = False) -> dict:
        """One optimiser step on a fresh batch, at :func:`learning_rate` of the step; with
        ``observe`` the forward runs uncompiled so the attention probes (and the entropy monitor
        listening on them) see it."""
        cfg = self.cfg
        self.model.train()
        x, y = self.task.train_batch(cfg.batch_size, self.data_generator, self.device)  # GPT: (B, T) each
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self.world_size > 1:  # the same global batch on every rank, one slice each
            x = distributed.shard(x, self.rank, self.world_size)
            y = distributed.shard(y, self.rank, self.world_size)
        model = self.ddp if observe else self.compiled
        step = self.step + 1
        limits = nullcontext()
        if model is not self.ddp and self._recompile_limit is not None:
            from torch._dynamo import config as dynamo_config  # noqa: PLC0415

            limits = dynamo_config.patch(recompile_limit=self._recompile_limit)
        try:
            with self.autocast(), limits:
                _, loss = model(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        except FloatingPointError as exc:  # sigmaReparam's sigma estimate is not finite
            raise Diverged(step, f"non-finite weights ({exc})") from exc
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)).item()
        loss_value = distributed.mean_over_ranks(loss.detach()).item()
        if not math.isfinite(loss_value):
            raise Diverged(step, f"non-finite loss ({loss_value})", loss_value, grad_norm)
        if not math.isfinite(grad_norm):
            raise Diverged(step, f"non-finite gradient norm ({grad_norm})", loss_value, grad_norm)
        lr = learning_rate(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        out = {"train_loss": loss_value, "grad_norm": grad_norm, "lr": lr}
        self.train_time += time.perf_counter() - t0
        self.tokens_seen += cfg.batch_size * self.task.tokens_per_example
        self.step += 1
        return out

    @torch.no_grad()
    def evaluate(self, batches=None) -> float:
        """Mean loss over the task's held-out batches (the same batches at every call), or over
        ``batches`` (the test split's at the last step of a ``test_split`` run).

        For the classifiers (ViT: test images; seq2seq: target tokens under teacher forcing) the
        fraction predicted right is kept in :attr:`last_val_accuracy` (``None`` for the GPT).
        """
        self.model.eval()
        losses, right, total = [], 0, 0
        prepare = getattr(self.task, "prepare_eval", None)  # the self-supervised task fits its linear probe
        if prepare is not None:
            prepare(self.model, self.device)
        for x, y in (self.task.eval_batches(self.device) if batches is None else batches):
            with self.autocast():
                logits, loss = self.model(x, y)
            losses.append(loss.item())
            counts = self.task.correct(logits, y)
            if counts is not None:
                right, total = right + counts[0], total + counts[1]
        self.model.train()
        self.last_val_accuracy = right / total if total else None
        return float(np.mean(losses))

    # ------------------------------------------------------------------ run
    def write_config(self) -> dict:
        """The run's ``config.json``: the config plus provenance."""
        record = {**self.cfg.to_dict(), "git_commit": git_commit(), "git_dirty": self.git_dirty,
                  "versions": package_versions(),
                  "device": str(self.device), "device_name": device_name(self.device),
                  **self.task.config_fields(), "n_params": sum(p.numel() for p in self.model.parameters()),
                  "flops_per_token": self._flops_per_token,
                  # the command as typed, its program by name only (no install path of this machine)
                  "argv": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []}
        if self.out_dir is not None:
            atomic_write_text(self.out_dir / CONFIG_NAME, json.dumps(record, indent=2) + "\n")
        return record

    def run(self) -> dict:
        """Train until ``cfg.steps``, logging, sampling and checkpointing; returns the summary.

        A checkpoint is written every ``cfg.checkpoint_every`` steps and at the end.  On a
        non-finite loss or gradient the run stops (the summary says ``diverged``); on SIGINT or
        SIGTERM it finishes the step, writes the checkpoint and raises :class:`TrainingInterrupted`.
        A step that is not done :attr:`stop_timeout` seconds after the signal (or a second signal)
        is abandoned: nothing of it is written and :class:`TrainingAborted` is raised, the last
        checkpoint left as it was.  Only the part of a step that writes nothing is ever abandoned
        (the records, samples and checkpoint are written after it, each whole or not at all).
        """
        cfg = self.cfg
        if self.finished:  # a resumed finished run: report it, write nothing
            self.summary = json.loads((self.out_dir / SUMMARY_NAME).read_text())
            return self.summary
        writes = self.out_dir is not None and self.is_main
        if writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            check_no_links(self.out_dir, (METRICS_NAME, CONFIG_NAME, SUMMARY_NAME, CHECKPOINT_NAME, "samples",
                                          *(f"samples/step_{s:06d}.npz" for s in cfg.sample_steps)))
        if self.is_main:
            self.write_config()
        metrics = open(self.out_dir / METRICS_NAME, "a") if writes else None
        board = None
        if self.tensorboard is not None and self.is_main:
            from sigma_core.integrations.tensorboard import TensorBoardSink  # noqa: PLC0415 (optional package)

            # written during the forward of step self.step + 1, the step metrics.jsonl calls it
            board = TensorBoardSink(self.tensorboard, step=lambda: self.step + 1)
        self._stop_signal = None
        handlers = self._install_signal_handlers()
        last: dict = {}
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress or not self.is_main,
                       desc=f"{cfg.model} {cfg.reparam} lr={cfg.lr:g}", dynamic_ncols=True)
            while self.step < cfg.steps:
                step = self.step + 1
                self._enter_step(step)
                logging = step % cfg.log_every == 0 or step == cfg.steps or step == 1
                try:
                    with observed(self.model, enabled=logging and self.is_main,
                                  sinks=() if board is None else (board,)) as monitor:
                        out = self.train_step(observe=logging)
                except Diverged as exc:
                    self._leave_step()
                    self.diverged = exc
                    record = {"step": exc.step, "diverged": True, "reason": exc.reason,
                              "train_loss": _finite_or_none(exc.loss), "grad_norm": _finite_or_none(exc.grad_norm)}
                    self._write_record(metrics, record)
                    break
                bar.update(1)
                pre = self._collective_logging(step) if logging and self.sharded else {}
                if logging and self.is_main:
                    record = {"step": step, **out, **attention_metrics(monitor, self.model, gamma=pre.get("gamma")),
                              "tokens_seen": self.tokens_seen, "train_time_s": self.train_time,
                              "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9)}
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        record["val_loss"] = pre["val_loss"] if "val_loss" in pre else self.evaluate()
                        if self.last_val_accuracy is not None:
                            record["val_accuracy"] = self.last_val_accuracy
                    samples = None
                    if step == cfg.steps and cfg.test_split:  # evaluated once, never used to choose
                        accuracy = self.last_val_accuracy
                        record["test_loss"] = self.evaluate(self.task.test_batches(self.device))
                        if self.last_val_accuracy is not None:
                            record["test_accuracy"] = self.last_val_accuracy
                        self.last_val_accuracy = accuracy
                    if step in cfg.sample_steps:
                        samples = pre["samples"] if "samples" in pre else row_samples(
                            self.model, *self.task.sample_inputs(self.device))
                        record["sample_violations"] = int(samples["violations"])
                    self._leave_step()  # from here on the step writes: it is no longer abandoned
                    if samples is not None:
                        if self.out_dir is not None:
                            path = self.out_dir / "samples" / f"step_{step:06d}.npz"
                            path.parent.mkdir(exist_ok=True)
                            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                            with open(tmp, "wb") as fh:  # atomic: a kill never leaves a truncated .npz
                                np.savez_compressed(fh, **{k: v for k, v in samples.items() if k != "violations"})
                            os.replace(tmp, path)
                    self._write_record(metrics, record)
                    if board is not None:
                        for key in ("train_loss", "val_loss", "val_accuracy", "grad_norm", "lr"):
                            if isinstance(record.get(key), (int, float)):
                                board.writer.add_scalar(key, record[key], step)
                        board.writer.flush()
                    last = record
                    bar.set_postfix(loss=f"{out['train_loss']:.3f}", ent=f"{record['entropy_mean']:.2f}",
                                    ent_min=f"{record['entropy_min_head']:.3f}")
                self._leave_step()
                stop = distributed.any_rank(self._stop_signal or 0)
                if self.out_dir is not None and (stop or step == cfg.steps or (
                        cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    self.save_checkpoint()
                if stop:
                    bar.close()
                    raise TrainingInterrupted(stop, self.step, self.out_dir)
            bar.close()
        except _StepAborted as exc:
            bar.close()
            raise TrainingAborted(exc.signum, self._step_number, self.out_dir, self._checkpoint_step) from None
        finally:
            self._leave_step()
            self._restore_signal_handlers(handlers)
            if metrics is not None:
                metrics.close()
            if board is not None:
                board.close()
        if self.world_size > 1:
            self.replicas_consistent = distributed.replicas_agree(self.model)
            if not self.replicas_consistent:
                raise RuntimeError("model replicas differ across ranks after training (DDP out of sync)")
        self.summary = self._summarise(last)
        if writes:
            atomic_write_text(self.out_dir / SUMMARY_NAME, json.dumps(self.summary, indent=2) + "\n")
        return self.summary

    def _collective_logging(self, step: int) -> dict:
        """Under FSDP2, what a logged step computes with forwards or gathered weights, on every
        rank (a forward of rank 0 alone would wait for the others' all-gathers forever)."""
        cfg, pre = self.cfg, {}
        if any(True for _ in _sigma_state_names(self.model)):
            pre["gamma"] = attention_gammas(self.model)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            pre["val_loss"] = self.evaluate()
            pre["val_accuracy"] = self.last_val_accuracy
        if step in cfg.sample_steps:
            pre["samples"] = row_samples(self.model, *self.task.sample_inputs(self.device))
        return pre

    @staticmethod
    def _write_record(metrics, record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            os.fsync(metrics.fileno())

    def _enter_step(self, step: int) -> None:
        with self._step_lock:
            self._step_number, self._in_step = step, True
            self._step_over.clear()

    def _leave_step(self) -> None:
        with self._step_lock:
            self._in_step = False
            self._step_over.set()

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM set a flag read after the current step; when that step is not done
        :attr:`stop_timeout` seconds later, or a second signal comes, the step is abandoned
        (:class:`_StepAborted`, raised only where the step writes nothing).

        A Python signal handler runs only when the main thread returns to the interpreter, which
        a step inside one long operation does not do for minutes; so the signal also reaches a
        watchdog thread at once, through :func:`signal.set_wakeup_fd`.  After ``stop_timeout``
        the watchdog signals the main thread again (its handler raises as soon as it runs) and,
        with :attr:`exit_when_stuck`, ends the process :data:`STUCK_EXIT_S` seconds later if the
        step is still inside one operation (nothing is being written then: the last checkpoint
        stays whole, as after a SIGKILL).
        """
        if threading.current_thread() is not threading.main_thread():
            return {}
        main = threading.main_thread().ident
        self._abandon = False

        def handler(signum, frame):
            first = self._stop_signal is None
            if first:
                self._stop_signal = signum
                if self.is_main:
                    limit = (f"; if it is not done in {self.stop_timeout:g} s it is abandoned"
                             if self.stop_timeout is not None else "")
                    print(f"\n{signal.Signals(signum).name} received: finishing step {self._step_number}, "
                          f"then writing the checkpoint{limit} (send it again to abandon the step at once)",
                          file=sys.stderr, flush=True)
            if (self._abandon or not first) and self._in_step:
                raise _StepAborted(self._stop_signal)
            # otherwise the step is done and being written (records, checkpoint): that finishes,
            # then the run stops

        def watchdog(read_fd):
            armed = False
            while True:
                try:
                    data = os.read(read_fd, 64)
                except OSError:
                    break
                if not data:
                    break
                sigs = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
                if not sigs or armed or self.stop_timeout is None:
                    continue
                armed = True
                signum = sigs[0]
                # a signal between steps (before the first, or while a checkpoint is written): the
                # run stops after the step that begins next, so that step is the one timed
                while not self._in_step and not done.is_set():
                    done.wait(0.05)
                if done.is_set() or self._step_over.wait(self.stop_timeout):
                    continue
                if self.is_main:
                    print(f"step {self._step_number} not done {self.stop_timeout:g} s after "
                          f"{signal.Signals(signum).name}: abandoning it", file=sys.stderr, flush=True)
                self._abandon = True
                signal.pthread_kill(main, signum)  # its handler raises _StepAborted in the main thread
                if not self.exit_when_stuck or self._step_over.wait(STUCK_EXIT_S):
                    continue
                with self._step_lock:  # held by the main thread only to leave the step: it is not writing
                    if self._in_step:
                        if self.is_main:
                            print(f"entropy-collapse train: step {self._step_number} is stuck in one operation; "
                                  + abort_message(signum, self._step_number, self.out_dir, self._checkpoint_step),
                                  file=sys.stderr, flush=True)
                        os._exit(128 + signum)
            os.close(read_fd)

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        done = threading.Event()  # set when the handlers are restored: the watchdog then stops waiting
        old["done"] = done
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            old["wakeup_fd"] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):  # pragma: no cover - not the main thread, or an unusual platform
            os.close(read_fd)
            os.close(write_fd)
            return old
        old["write_fd"] = write_fd
        threading.Thread(target=watchdog, args=(read_fd,), daemon=True, name="entropy-collapse stop watchdog").start()
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        old = dict(old)
        if "done" in old:
            old.pop("done").set()
        write_fd = old.pop("write_fd", None)
        if "wakeup_fd" in old:
            signal.set_wakeup_fd(old.pop("wakeup_fd"))
        if write_fd is not None:
            os.close(write_fd)  # the watchdog reads its end and stops
        for sig, h in old.items():
            signal.signal(sig, h)

    def _summarise(self, last: dict) -> dict:
        tokens_per_s = self.tokens_seen / max(self.train_time, 1e-9)
        summary = {"steps": self.step, "diverged": self.diverged is not None,
                   "diverged_step": self.diverged.step if self.diverged is not None else None,
                   "world_size": self.world_size, "preset": self.cfg.preset, "model": self.cfg.model,
                   "norm": self.cfg.norm, "optimizer": self.cfg.optimizer, "reparam": self.cfg.reparam,
                   "lr": self.cfg.lr, "final_train_loss": last.get("train_loss"),
                   "final_val_loss": last.get("val_loss"), "final_val_accuracy": last.get("val_accuracy"),
                   **({"final_test_loss": last.get("test_loss"), "final_test_accuracy": last.get("test_accuracy")}
                      if self.cfg.test_split else {}),
                   "git_dirty": self.git_dirty, "entropy_mean": last.get("entropy_mean"),
                   "entropy_min_head": last.get("entropy_min_head"), "sigma_max": last.get("sigma_max"),
                   "bound_violations": None, "train_time_s": self.train_time,
                   "tokens_per_s": tokens_per_s, "device_name": device_name(self.device)}
        if self.out_dir is not None:
            from sigma_core.experiments.report import read_metrics  # noqa: PLC0415

            records = read_metrics(self.out_dir)
            summary["bound_violations"] = int(sum(r.get("bound_violations", 0) + r.get("sample_violations", 0)
                                                  for r in records))
        else:
            summary["bound_violations"] = int(last.get("bound_violations", 0) + last.get("sample_violations", 0))
        if self.device.type == "cuda":
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name(self.device)), None)
            if peak:
                summary["mfu"] = tokens_per_s * self._flops_per_token / peak
        return summary


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint on the CPU (:func:`read_checkpoint_file`); :class:`CheckpointError`
    also when the file holds something other than a training state."""
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a training checkpoint (holds {have})")
    return state


def read_checkpoint_file(path: str | os.PathLike):
    """The object in a file written by :func:`atomic_torch_save`, on the CPU; :class:`CheckpointError`
    says whether it is missing or truncated/corrupted (its sha256 does not match the one in its
    header).

    Nothing in the file can run code: it is unpickled with ``torch.load(weights_only=True)``
    (tensors, numbers, strings and containers only), and only after its checksum matched.
    Checkpoints of versions before the checksum (plain ``torch.save`` files) load the same way,
    without the checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if data.startswith(CHECKPOINT_MAGIC):
        head, sep, payload = data[len(CHECKPOINT_MAGIC):].partition(b"\n")
        if not sep or hashlib.sha256(payload).hexdigest().encode() != head:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted: its content does not match "
                                  f"the sha256 written with it")
    else:
        payload = data
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted, or holds objects other than "
                              f"tensors, numbers and containers (refused: loading those could run code)") from exc
    except Exception as exc:  # zipfile, EOF and RuntimeError all mean an unreadable file
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted "
                              f"({type(exc).__name__}: {exc})") from exc
    return state


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` with ``step <= step`` (atomically); returns how many
    were dropped (records after a checkpoint, a half-written last line)."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += bool(line.strip())
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def run_demo(out_dir: str | os.PathLike, *, preset_name: str | None = None, steps: int | None = None,
             log=print) -> Path:
    """Train the baseline and sigmaReparam at the preset's (collapsing) learning rate, then report.

    ``preset_name`` defaults to ``"h200"`` when CUDA is available and ``"cpu-demo"`` otherwise;
    ``steps`` overrides the preset's step count (for a quick look).  Runs go to
    ``out_dir/baseline`` and ``out_dir/sigma-reparam``, the report to ``out_dir/report``.
    Returns the path of ``report.md``.
    """
    from sigma_core.experiments.config import preset  # noqa: PLC0415
    from sigma_core.experiments.report import summarise_run, write_report  # noqa: PLC0415

    name = preset_name or ("h200" if torch.cuda.is_available() else "cpu-demo")
    overrides = {"steps": steps} if steps is not None else {}
    out = Path(out_dir)
    run_dirs = []
    for label, reparam in (("baseline", "none"), ("sigma-reparam", "sigma")):
        cfg = preset(name, reparam=reparam, **overrides)
        run_dir = out / label
        clear_run_dir(run_dir)  # a fresh run, not an append to an old log; a user's file is kept (error)
        log(f"[demo] training {label} ({name}, lr={cfg.lr:g}, {cfg.steps} steps) -> {run_dir}")
        summary = Trainer(cfg, run_dir).run()
        log(f"[demo] {label}: final loss {summary['final_train_loss']:.3f}, mean entropy "
            f"{summary['entropy_mean']:.3f}, min head entropy {summary['entropy_min_head']:.4f}, max sigma_h "
            f"{summary['sigma_max']:.3g}, bound violations {summary['bound_violations']}, "
            f"{summary['tokens_per_s']:.0f} tokens/s" + (f", MFU {summary['mfu']:.1%}" if "mfu" in summary else ""))
        run_dirs.append(run_dir)
    report = write_report(run_dirs, out / "report")
    first = summarise_run(run_dirs[0])["first_collapse_step"]
    log(f"[demo] baseline: first logged step with a head below 0.1 nats: {first or 'never'}")
    log(f"[demo] report written to {report}")
    return report
