"""The compiled fast path of the entropy monitor: row entropies by a small C++ kernel.

``csrc/row_entropy.cpp`` computes the entropy of every row of ``softmax(scale q k^T)`` in one pass
per ``(batch, head)``: the logits of 8 query rows at a time are accumulated in vector registers and
reduced at once in the stable form ``log sum e - sum e s / sum e`` with ``s = z - max z`` (floored at
``-80``), never storing more than 8 rows of logits.  On the project's cpu-demo GPT it takes about
half the time of the same computation in PyTorch operations (``benchmarks/bench_entropy.py``).

It is built with :func:`torch.utils.cpp_extension.load` the first time it is needed (about 25 s with
a C++ compiler; ninja comes with the package; cached afterwards under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per instruction set (the name carries PyTorch's CPU
capability, so a cache shared by different machines never runs code built for another CPU).
Without a compiler, or with ``SIGMA_CORE_NATIVE=0`` in the environment, :func:`row_entropy_kernel`
returns None and :func:`sigma_core.entropy.fused_row_entropy` uses its PyTorch path (a warning
says why, once).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from contextlib import contextmanager
import time
import warnings
from pathlib import Path

import torch

#: environment variable: "0" disables the compiled kernel (no build is attempted)
ENV = "SIGMA_CORE_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "row_entropy.cpp"
#: lanes of the kernel's vectors: keys are padded to a multiple of this
LANES = 16

# compiler flags per CPU capability reported by PyTorch (what its own kernels use on this machine)
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_lock = threading.Lock()
logger = logging.getLogger(__name__)
_state: dict = {"tried": False, "module": None, "error": None}


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old or unusual builds
        return "DEFAULT"


#: a build lock older than this (seconds) is left over from a killed build: PyTorch's builder would
#: wait for it forever, so it is removed (a build takes about 25 s)
STALE_LOCK_SECONDS = 600


def _build_dir(name: str) -> Path | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False))
    except Exception:  # a private helper: if it moves, only the message and the lock check are lost
        return None


def _built(name: str) -> bool:
    """Whether a build of ``name`` is in PyTorch's extension cache (a stale one is rebuilt anyway)."""
    d = _build_dir(name)
    return d is None or (d / f"{name}.so").exists()


def _clear_stale_lock(name: str) -> None:
    """Remove the build lock of a build that was killed (SIGKILL, out of memory) long ago."""
    d = _build_dir(name)
    lock = None if d is None else d / "lock"
    try:
        if lock is not None and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            logger.warning("sigma_core: removed a stale build lock left by a killed build: %s", lock)
    except OSError:  # no lock (the usual case), or another process removed it first
        pass


#: how long a process waits for another one's build of the kernel before it gives up and uses
#: the PyTorch path (a build takes about 25 s)
BUILD_WAIT_SECONDS = 120


@contextmanager
def _build_guard(name: str):
    """Hold an OS file lock (``fcntl.flock``) while building ``name``.

    The operating system releases the lock when its holder dies, so once it is held any build
    lock file PyTorch's builder left beside the build (its own lock, which it would wait on for
    ever after a SIGKILL) belongs to a dead build and is removed at once.  Waiting for a live
    build is bounded by :data:`BUILD_WAIT_SECONDS` (then :class:`TimeoutError`, and the caller
    falls back to the PyTorch path) and sleeps in short steps, so a signal ends it.
    """
    d = _build_dir(name)
    if d is None:
        yield
        return
    d.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{name}.flock", "w") as fh:
        deadline = time.monotonic() + BUILD_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building {name} for over "
                                       f"{BUILD_WAIT_SECONDS} s") from None
                time.sleep(0.1)
        try:
            lock = d / "lock"
            if lock.exists():
                lock.unlink(missing_ok=True)
                logger.warning("sigma_core: removed the build lock of a killed build: %s", lock)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ninja_on_path() -> None:
    """PyTorch's builder runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) puts it in the
    environment's scripts directory, which is not on PATH unless the environment is activated:
    append that directory (only when no ninja is found)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join(p for p in (os.environ.get("PATH", ""), ninja.BIN_DIR) if p)


def row_entropy_kernel():
    """The compiled module (with ``row_entropy(q, kt, Tk, scale, causal)``), or None.

    None when ``SIGMA_CORE_NATIVE=0`` or when the build failed (the first failure warns with the
    reason; later calls return None at once).
    """
    if os.environ.get(ENV, "1").strip() == "0":
        return None
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            try:
                from torch.utils.cpp_extension import load

                _ninja_on_path()
                cap = _capability()
                name = f"sigma_core_row_entropy_{cap.lower()}"
                _clear_stale_lock(name)
                if not _built(name):  # say why the first recorded forward pauses
                    logger.warning("sigma_core: building the compiled entropy kernel of the monitor "
                                   "(once per machine and PyTorch version, about 25 s)")
                with _build_guard(name):
                    _state["module"] = load(
                        name=name,
                        sources=[str(SOURCE)],
                        extra_cflags=["-O3", *_ISA_FLAGS.get(cap, [])],
                        verbose=False,
                    )
            except Exception as err:  # no compiler, no ninja, unwritable cache, unsupported platform
                _state["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                warnings.warn("sigma_core: the compiled entropy kernel could not be built "
                              f"({_state['error']}); the entropy monitor uses its PyTorch path instead "
                              f"(slower; set {ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=2)
            _state["tried"] = True
    return _state["module"]


def row_entropy(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool):
    """Row entropies ``(B, H, Tq)`` of ``softmax(scale q k^T)`` by the compiled kernel, or None.

    ``q``, ``k``: float32 CPU tensors ``(B, H, Tq, d)``, ``(B, H, Tk, d)`` (any strides); ``causal``
    needs ``Tq == Tk`` (row ``i`` sees keys ``0..i``).  None when the kernel is not available.
    Non-finite inputs give non-finite entropies (the caller checks).
    """
    kernel = row_entropy_kernel()
    if kernel is None:
        return None
    B, H, Tk, d = k.shape
    kt = k.new_zeros((B, H, d, -(-Tk // LANES) * LANES))  # keys transposed, zero-padded to whole vectors
    kt[..., :Tk].copy_(k.transpose(-1, -2))
    if q.stride(-1) != 1:
        q = q.contiguous()
    return kernel.row_entropy(q, kt, Tk, float(scale), bool(causal))
