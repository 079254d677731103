"""The compiled fast path of the entropy monitor: row entropies by a small C++ kernel.

``csrc/row_entropy.cpp`` computes the entropy of every row of ``softmax(scale q k^T)`` in one pass
per ``(batch, head)``: the logits of a few query rows at a time (8 with AVX-512, 6 with AVX2) are
accumulated in vector registers of the machine's own width (16 floats with AVX-512, 8 with AVX2, 4
otherwise) and reduced at once in the stable form ``log sum e - sum e s / sum e`` with
``s = z - max z`` (floored at ``-80``), never storing more than those rows of logits.

It is built with :func:`torch.utils.cpp_extension.load` the first time it is needed (about 25 s with
a C++ compiler; ninja comes with the package; cached afterwards under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per instruction set and PyTorch version (the name carries
PyTorch's CPU capability and version, so a cache shared by different machines never runs code built
for another CPU).  Without a compiler, or with ``SIGMA_CORE_NATIVE=0`` in the environment,
:func:`row_entropy_kernel` returns None and :func:`sigma_core.entropy.fused_row_entropy` uses its
PyTorch path (a warning says why, once).

Which path runs by default is measured, not assumed (:func:`prefer_kernel`): the first time the
choice is needed, both paths are timed on two small attention shapes (a fraction of a second) and
the faster one is kept, in a file beside the build (per CPU model and thread count, invalidated when
the kernel's source changes), so later processes reuse it.  ``SIGMA_CORE_NATIVE=1`` uses the kernel
without timing, ``SIGMA_CORE_NATIVE=0`` never builds it; ``native=True``/``False`` in
:func:`~sigma_core.entropy.fused_row_entropy` and :class:`~sigma_core.monitor.EntropyMonitor` picks a
path for one call or monitor.  :func:`describe` says which path runs and why.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import platform
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
#: the kernel pads the keys to a multiple of this (a whole number of its tiles on every instruction set)
LANES = 16

# compiler flags per CPU capability reported by PyTorch (what its own kernels use on this machine)
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_lock = threading.Lock()
logger = logging.getLogger(__name__)
_state: dict = {"tried": False, "module": None, "error": None}
#: the measured choice of this process (see :func:`prefer_kernel`): None until first needed
_choice: dict = {"record": None}


def _name(cap: str) -> str:
    """The extension's name: one build per CPU capability and PyTorch version."""
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    return f"sigma_core_row_entropy_{cap.lower()}_torch{version}"


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


def _env_mode() -> str:
    """``SIGMA_CORE_NATIVE``: "0" (never the kernel), "1" (the kernel, untimed) or "auto" (unset)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0, 1 or auto (or unset), got {os.environ[ENV]!r}")
    return value


def row_entropy_kernel():
    """The compiled module (with ``row_entropy(q, k, scale, causal)`` and ``lanes``), or None.

    None when ``SIGMA_CORE_NATIVE=0`` or when the build failed (the first failure warns with the
    reason; later calls return None at once).
    """
    if _env_mode() == "0":
        return None
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            try:
                from torch.utils.cpp_extension import load

                _ninja_on_path()
                cap = _capability()
                name = _name(cap)
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
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return kernel.row_entropy(q, k, float(scale), bool(causal))


# ---------------------------------------------------------------------------------------------
# which path runs by default: measured once per machine, kept beside the build

#: the shapes the first choice times, ``(batch, heads, T, d_head)``, causal, as small GPTs form them
CHOICE_SHAPES = ((8, 4, 128, 32), (2, 4, 256, 64))
#: timed rounds per path (interleaved; the best round of each counts)
CHOICE_ROUNDS = 5
CHOICE_FILE = "choice.json"
_choice_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    """The CPU's model name (read once: the choice is looked up on every recorded attention call)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _choice_path() -> Path | None:
    d = _build_dir(_name(_capability()))
    return None if d is None else d / CHOICE_FILE


def _choice_key() -> str:
    return f"{_cpu_model()} | {torch.get_num_threads()} threads"


def _time_paths(torch_path) -> tuple[float, float]:
    """Best round of each path (kernel, PyTorch) over :data:`CHOICE_SHAPES`, rounds interleaved,
    after one untimed round.  Process time with one thread (robust to a loaded machine), wall time
    with several (their work is spread over cores)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    g = torch.Generator().manual_seed(0)
    cases = []
    for B, H, T, d in CHOICE_SHAPES:  # (B, H, T, d) views of (B, T, H d) projections
        q, k = (torch.randn(B, T, H * d, generator=g).view(B, T, H, d).transpose(1, 2) for _ in range(2))
        cases.append((q, k, d ** -0.5))
    paths = (row_entropy, torch_path)
    best = [math.inf, math.inf]
    with torch.no_grad():
        for rnd in range(CHOICE_ROUNDS + 1):
            for i, f in enumerate(paths):
                t0 = clock()
                for q, k, sc in cases:
                    f(q, k, sc, True)
                if rnd:
                    best[i] = min(best[i], clock() - t0)
    return best[0], best[1]


def _read_choice(path: Path | None, key: str, digest: str) -> dict | None:
    if path is None:
        return None
    try:
        rec = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: measure again
        return None
    ok = isinstance(rec, dict) and rec.get("source") == digest and isinstance(rec.get("kernel"), bool)
    return rec if ok else None


def _write_choice(path: Path | None, key: str, rec: dict) -> None:
    if path is None:
        return
    try:
        try:
            table = json.loads(path.read_text())
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = rec
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader sees the old table or the new one
    except OSError as err:  # an unwritable cache: this process keeps its choice, the next measures again
        logger.info("sigma_core: could not store the kernel choice in %s: %s", path, err)


def prefer_kernel(torch_path) -> bool:
    """Whether the default (``native=None``) fast path should use the compiled kernel here.

    ``SIGMA_CORE_NATIVE=0``: never (no build); a failed build: never; ``SIGMA_CORE_NATIVE=1``:
    always, untimed.  Otherwise the measured choice: the first time it is needed on a machine (CPU
    model, thread count, PyTorch version and capability, kernel source), both paths are timed on
    :data:`CHOICE_SHAPES` (``torch_path(q, k, scale, causal)`` is the PyTorch one) and the faster
    is kept in ``choice.json`` beside the build; later calls and processes reuse it.

    Examples
    --------
    >>> from sigma_core.entropy import fused_row_entropy
    >>> isinstance(prefer_kernel(lambda q, k, s, c: fused_row_entropy(q, k, scale=s, causal=c, native=False)), bool)
    True
    """
    mode = _env_mode()
    if mode == "0" or row_entropy_kernel() is None:
        return False
    if mode == "1":
        return True
    key = _choice_key()
    rec = _choice["record"]
    if rec is not None and rec["key"] == key:
        return rec["kernel"]
    with _choice_lock:
        rec = _choice["record"]
        if rec is None or rec["key"] != key:
            digest = _source_digest()
            path = _choice_path()
            rec = _read_choice(path, key, digest)
            if rec is None:
                t_kernel, t_torch = _time_paths(torch_path)
                rec = {"source": digest, "kernel": t_kernel < t_torch, "kernel_s": t_kernel,
                       "torch_s": t_torch, "capability": _capability(), "torch": torch.__version__,
                       "shapes": [list(s) for s in CHOICE_SHAPES], "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
                _write_choice(path, key, rec)
            rec = dict(rec, key=key, file=None if path is None else str(path))
            _choice["record"] = rec
    return rec["kernel"]


def describe() -> str:
    """One line: which path the default fast path takes here, and why.

    Examples
    --------
    >>> isinstance(describe(), str)
    True
    """
    mode = _env_mode()
    if mode == "0":
        return f"PyTorch path ({ENV}=0)"
    if not _state["tried"]:
        return "not decided yet (the kernel is built and timed at the first recorded forward)"
    if _state["module"] is None:
        return f"PyTorch path (the compiled kernel did not build: {_state['error']})"
    if mode == "1":
        return f"compiled kernel ({ENV}=1, untimed)"
    rec = _choice["record"]
    if rec is None or rec["key"] != _choice_key():
        return "not decided yet for this thread count (timed at the next recorded forward)"
    which = "compiled kernel" if rec["kernel"] else "PyTorch path"
    return (f"{which} (measured: kernel {rec['kernel_s'] * 1e3:.2f} ms, PyTorch {rec['torch_s'] * 1e3:.2f} ms "
            f"on {len(rec['shapes'])} shapes, {rec['key']}, capability {rec['capability']}; cached in {rec['file']})")
