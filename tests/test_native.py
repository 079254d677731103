"""The compiled row-entropy kernel (sigma_core.native) against float64 references, at the edges.

The kernel is the EntropyMonitor's fast path on the CPU; these tests hold it to an independent
reference (float64 numpy softmax and scipy's ``entr``), to the exact values of uniform and one-hot
rows, and to the PyTorch path it replaces.  Where a C++ compiler and ninja exist (CI), the kernel
must build: a test asserts it, so the other tests cannot all skip silently.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.special import entr

from sigma_core import native
from sigma_core.entropy import fused_row_entropy

HAVE_COMPILER = shutil.which("c++") is not None and shutil.which("ninja") is not None


@pytest.fixture(scope="module")
def kernel():
    mod = native.row_entropy_kernel()
    if mod is None:
        pytest.skip(f"compiled kernel not available: {native._state['error'] or native.ENV + '=0'}")
    return mod


def reference(q, k, scale, causal):
    """float64: the entropy of every row of softmax(scale q k^T) over the keys it sees."""
    z = scale * (q.double().numpy() @ np.swapaxes(k.double().numpy(), -1, -2))
    B, H, Tq, Tk = z.shape
    out = np.empty((B, H, Tq))
    for idx in np.ndindex(B, H, Tq):
        row = z[idx][: idx[2] + 1] if causal else z[idx]
        p = np.exp(row - row.max())
        out[idx] = entr(p / p.sum()).sum()
    return out


def strided(B, H, T, d, gen, mag=1.0):
    """(B, H, T, d) views of a (B, T, H d) projection, as attention modules form them."""
    return (torch.randn(B, T, H * d, generator=gen) * mag).view(B, T, H, d).transpose(1, 2)


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler or ninja on this machine")
def test_the_kernel_builds_where_a_compiler_is():
    assert native.row_entropy_kernel() is not None, native._state["error"]


@given(B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 70), Tk=st.integers(1, 70),
       d=st.integers(1, 70), causal=st.booleans(), logit=st.floats(0.05, 30.0),
       sign=st.sampled_from([1.0, -1.0]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60)
def test_kernel_matches_the_float64_reference(kernel, B, H, Tq, Tk, d, causal, logit, sign, seed):
    """Any batch, heads, lengths (tails of the row blocks and key tiles), head dimension, causal or
    not, a negative scale, strided q, strided or contiguous k (the kernel transposes each head's
    keys itself), logits of typical size ``logit``."""
    if causal:
        Tk = Tq
    g = torch.Generator().manual_seed(seed)
    q = strided(B, H, Tq, d, g)
    k = strided(B, H, Tk, d, g) if seed % 2 else torch.randn(B, H, Tk, d, generator=g)
    scale = sign * logit / math.sqrt(d)
    got = native.row_entropy(q, k, scale, causal)
    assert got.shape == (B, H, Tq) and got.dtype == torch.float32
    ref = reference(q, k, scale, causal)
    # float32 logits carry a relative rounding ~1e-7 of their size; the reduction adds none
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=1e-6 * (1 + logit))


def test_kernel_takes_any_strides(kernel):
    """Views whose last dimension is not contiguous (every other column; a transposed layout) are
    copied first; broadcast batch dimensions (stride 0) are read in place."""
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(2, 3, 21, 10, generator=g)
    q, k = wide[..., ::2], wide.flip(2)[..., 1::2]  # (2, 3, 21, 5), strides (.., .., 10, 2)
    np.testing.assert_allclose(native.row_entropy(q, k, 0.7, True).double().numpy(),
                               reference(q, k, 0.7, True), rtol=0, atol=1e-6)
    kt = torch.randn(1, 3, 5, 21, generator=g).transpose(-1, -2)  # (1, 3, 21, 5) with stride 1 on T
    q = torch.randn(1, 1, 21, 5, generator=g).expand(1, 3, 21, 5)  # stride 0 over heads
    np.testing.assert_allclose(native.row_entropy(q, kt, 0.7, False).double().numpy(),
                               reference(q, kt, 0.7, False), rtol=0, atol=1e-6)


def test_kernel_exact_rows(kernel):
    """T = 1 has entropy 0; equal logits give log(keys seen) (causal row i: log(i + 1)); a row with
    one key far above the others has entropy ~0, and a hidden key far above all others (causal)
    is never seen by the rows before it."""
    q = torch.zeros(1, 1, 1, 4)
    assert native.row_entropy(q, q, 1.0, True).item() == 0.0
    T = 53
    q, k = torch.zeros(2, 3, T, 8), torch.randn(2, 3, T, 8)
    got = native.row_entropy(q, k, 1.0, True)
    np.testing.assert_allclose(got.double().numpy(), np.broadcast_to(np.log(np.arange(1, T + 1)), (2, 3, T)),
                               rtol=1e-6, atol=1e-6)
    assert torch.allclose(native.row_entropy(q, k, 1.0, False), torch.tensor(math.log(T)), atol=1e-6)
    q, k = torch.ones(1, 1, T, 1), torch.zeros(1, 1, T, 1)
    k[0, 0, T - 1, 0] = 1e4  # the last key: logit 1e4 for every row, seen only by the last row
    got = native.row_entropy(q, k, 1.0, True)[0, 0]
    np.testing.assert_allclose(got[:-1].double().numpy(), np.log(np.arange(1, T)), rtol=1e-6)
    assert 0.0 <= got[-1].item() < 1e-30  # the other keys enter at the floor e^-80: 52 * 80 e^-80


def test_kernel_long_rows_and_huge_logits(kernel):
    """T = 1000 causal (many vectors per row) against the reference; integer q, k whose logits reach
    1e4 and are exact in float32, so that any error is the reduction's: within 1e-6 of the float64
    reference, never NaN (the shift s = z - max z <= 0 leaves nothing to overflow or cancel)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1000, 8, generator=g), torch.randn(1, 2, 1000, 8, generator=g)
    np.testing.assert_allclose(native.row_entropy(q, k, 0.5, True).double().numpy(),
                               reference(q, k, 0.5, True), rtol=0, atol=2e-6)
    q = torch.randint(-50, 51, (2, 3, 90, 4), generator=g).float()
    k = torch.randint(-50, 51, (2, 3, 90, 4), generator=g).float()
    for causal in (True, False):
        got = native.row_entropy(q, k, 1.0, causal)
        np.testing.assert_allclose(got.double().numpy(), reference(q, k, 1.0, causal), rtol=0, atol=1e-6)


def test_kernel_threads_agree_bit_for_bit(kernel):
    """(batch, head) pairs are independent: two threads give the same bits as one."""
    g = torch.Generator().manual_seed(1)
    q, k = strided(4, 3, 40, 16, g), strided(4, 3, 40, 16, g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.row_entropy(q, k, 0.25, True)
        torch.set_num_threads(2)
        two = native.row_entropy(q, k, 0.25, True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_non_finite_inputs_poison_their_head_only(kernel):
    """A NaN query or an infinite key makes its (batch, head) NaN and leaves the others exact; the
    fused path then declines (None), as for the PyTorch path."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 20, 4, generator=g), torch.randn(2, 2, 20, 4, generator=g)
    clean = native.row_entropy(q, k, 0.5, True)
    q[1, 0, 7, 2] = math.nan
    k[0, 1, 19, 0] = math.inf  # only the last causal row sees this key
    got = native.row_entropy(q, k, 0.5, True)
    assert torch.isnan(got[1, 0]).all() and torch.isnan(got[0, 1]).all()
    assert torch.equal(got[0, 0], clean[0, 0]) and torch.equal(got[1, 1], clean[1, 1])
    assert fused_row_entropy(q, k, scale=0.5, causal=True) is None


def test_fused_path_uses_the_kernel_and_agrees_with_the_pytorch_path(kernel, monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k = strided(3, 4, 128, 32, g), strided(3, 4, 128, 32, g)
    fast = fused_row_entropy(q, k, causal=True)
    slow = fused_row_entropy(q, k, causal=True, native=False)
    assert torch.allclose(fast, slow, atol=2e-6)
    calls = []
    real = native.row_entropy
    monkeypatch.setattr("sigma_core.entropy.native_row_entropy", lambda *a: calls.append(1) or real(*a))
    fused_row_entropy(q, k, causal=True)
    fused_row_entropy(q, k, causal=True, native=False)
    assert calls == [1]


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.row_entropy_kernel() is None and native.row_entropy(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), 1.0, False) is None
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    assert fused_row_entropy(q, k, causal=True) is not None  # the PyTorch path


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_state", {"tried": False, "module": None, "error": None})
    monkeypatch.setattr(cpp, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required"):
        assert native.row_entropy_kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call: no attempt, no warning
        assert native.row_entropy_kernel() is None
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    got = fused_row_entropy(q, k, causal=True)
    np.testing.assert_allclose(got.double().numpy(), reference(q, k, 0.5, True), rtol=0, atol=1e-6)


def test_monitor_records_the_same_entropies_with_and_without_the_kernel(kernel):
    from sigma_core.models.gpt import GPT, ModelConfig
    from sigma_core.monitor import EntropyMonitor
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_layer=2, n_head=4, block_size=40))
    idx = torch.randint(0, 256, (3, 40))
    recs = {}
    for flag in (True, False):
        with EntropyMonitor(model, native=flag) as mon:
            model(idx)
            recs[flag] = mon.last
    assert len(recs[True]) == len(recs[False]) == 8
    for a, b in zip(recs[True], recs[False]):
        for key in ("entropy_mean", "entropy_min", "entropy_max", "entropy_mean_half"):
            assert abs(a[key] - b[key]) < 2e-6
        assert a["violations_exact"] == b["violations_exact"] == 0
    with pytest.raises(TypeError, match="native must be a bool"):
        EntropyMonitor(model, native="yes")


def test_ninja_from_the_wheel_is_put_on_path(monkeypatch):
    """Without a ninja on PATH, the ninja wheel's directory is appended (PyTorch's builder runs
    ``ninja`` from PATH); with one, PATH is left alone."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep) == ["/nonexistent", ninja.BIN_DIR]
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(native.shutil, "which", lambda name: "/usr/bin/ninja")
    native._ninja_on_path()
    assert os.environ["PATH"] == "/nonexistent"


def test_a_first_build_says_so(monkeypatch, caplog, tmp_path):
    """When the kernel is not in PyTorch's extension cache yet, the pause is announced (a warning on
    the logger, which reaches stderr without any logging set up); a cached one loads silently."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty extension cache
    assert native._built("sigma_core_row_entropy_avx512") is False
    loaded = object()
    monkeypatch.setattr(cpp, "load", lambda **kwargs: loaded)
    for cached in (False, True):
        monkeypatch.setattr(native, "_state", {"tried": False, "module": None, "error": None})
        monkeypatch.setattr(native, "_built", lambda name: cached)
        caplog.clear()
        with caplog.at_level("WARNING", logger="sigma_core.native"):
            assert native.row_entropy_kernel() is loaded
        assert ("building the compiled entropy kernel" in caplog.text) is (not cached)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path):
    """PyTorch's builder waits forever for the lock file of a build that was killed; one older than
    STALE_LOCK_SECONDS is removed before building, a recent one (a build in progress) is left."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = "sigma_core_row_entropy_test"
    lock = native._build_dir(name) / "lock"
    lock.write_text("")
    native._clear_stale_lock(name)
    assert lock.exists()  # recent: a build in progress
    old = time.time() - native.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    native._clear_stale_lock(name)
    assert not lock.exists()
    native._clear_stale_lock(name)  # no lock: nothing to do


def test_a_lock_left_by_a_killed_build_is_removed_at_once(monkeypatch, tmp_path):
    """A SIGKILL during the first build leaves PyTorch's lock file; with no live builder holding
    the OS lock, the next build removes it at once instead of waiting on it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = "sigma_core_row_entropy_test"
    lock = native._build_dir(name) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")  # fresh: _clear_stale_lock keeps it
    with native._build_guard(name):
        assert not lock.exists()


def test_waiting_for_another_build_is_bounded(monkeypatch, tmp_path):
    """While another process holds the build lock, the wait ends after BUILD_WAIT_SECONDS with a
    TimeoutError (the caller then uses the PyTorch path) instead of hanging."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "BUILD_WAIT_SECONDS", 0.5)
    name = "sigma_core_row_entropy_test"
    d = native._build_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    code = (f"import fcntl, time; fh = open({str(d.parent / f'.{name}.flock')!r}, 'w'); "
            "fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="building"):
            with native._build_guard(name):
                pass
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    with native._build_guard(name):  # the holder died: the OS released its lock
        pass


def test_the_build_uses_the_machines_vector_width(kernel):
    """16 lanes with AVX-512, 8 with AVX2, 4 otherwise: a 16-lane vector on an AVX2 machine keeps
    the 8 accumulators on the stack and made the kernel 3x slower than the PyTorch path on an
    AMD EPYC (AVX2)."""
    assert kernel.lanes == {"AVX512": 16, "AVX2": 8}.get(native._capability(), 4)
    assert native.LANES % kernel.lanes == 0
    assert "avx2" in native._name("AVX2") and torch.__version__.split("+")[0].replace(".", "_") in native._name("AVX2")


@pytest.fixture
def choice(monkeypatch, tmp_path):
    """An available kernel (the real one is not needed), an empty choice cache in tmp_path, and a
    stand-in for the timing that counts its calls and returns ``times`` (kernel, PyTorch)."""
    monkeypatch.setattr(native, "_state", {"tried": True, "module": object(), "error": None})
    monkeypatch.setattr(native, "_choice", {"record": None})
    monkeypatch.setattr(native, "_choice_path", lambda: tmp_path / native.CHOICE_FILE)
    monkeypatch.delenv(native.ENV, raising=False)
    box = {"calls": 0, "times": (1.0, 2.0)}

    def timing(torch_path):
        box["calls"] += 1
        return box["times"]

    monkeypatch.setattr(native, "_time_paths", timing)
    box["file"] = tmp_path / native.CHOICE_FILE
    return box


def test_the_choice_is_measured_once_and_reused(choice, monkeypatch):
    """The first call times both paths and keeps the faster; later calls, and a new process (the
    file beside the build), reuse it without timing; another kernel source or thread count, or an
    unreadable file, is measured again."""
    assert native.prefer_kernel(None) is True and choice["calls"] == 1
    assert native.prefer_kernel(None) is True and choice["calls"] == 1
    table = json.loads(choice["file"].read_text())
    (key, rec), = table.items()
    assert key == native._choice_key() and rec["kernel"] is True and (rec["kernel_s"], rec["torch_s"]) == (1.0, 2.0)
    assert rec["source"] == native._source_digest() and rec["torch"] == torch.__version__
    assert "compiled kernel (measured: kernel 1000.00 ms, PyTorch 2000.00 ms" in native.describe()
    choice["times"] = (3.0, 1.0)  # were it measured again, the PyTorch path would win
    monkeypatch.setattr(native, "_choice", {"record": None})  # a new process: reads the file
    assert native.prefer_kernel(None) is True and choice["calls"] == 1
    monkeypatch.setattr(native, "_choice", {"record": None})
    monkeypatch.setattr(native, "_source_digest", lambda: "another-source")  # the kernel changed
    assert native.prefer_kernel(None) is False and choice["calls"] == 2
    assert "PyTorch path (measured: kernel 3000.00 ms, PyTorch 1000.00 ms" in native.describe()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if n == 1 else 1)  # another thread count: its own entry
        choice["times"] = (1.0, 2.0)
        assert native.prefer_kernel(None) is True and choice["calls"] == 3
        assert len(json.loads(choice["file"].read_text())) == 2
    finally:
        torch.set_num_threads(n)
    assert native.prefer_kernel(None) is False and choice["calls"] == 3  # back: the file's entry, untimed
    choice["file"].write_text("{not json")
    monkeypatch.setattr(native, "_choice", {"record": None})
    assert native.prefer_kernel(None) is True and choice["calls"] == 4


def test_the_environment_and_the_argument_override_the_choice(choice, monkeypatch):
    """SIGMA_CORE_NATIVE=1 takes the kernel and =0 the PyTorch path whatever was measured (no
    timing); native=True/False picks for one call; anything else in the variable is an error
    naming it."""
    choice["times"] = (3.0, 1.0)  # measured: the PyTorch path wins
    g = torch.Generator().manual_seed(4)
    q, k = strided(2, 3, 30, 8, g), strided(2, 3, 30, 8, g)
    calls = []
    monkeypatch.setattr("sigma_core.entropy.native_row_entropy",
                        lambda *a: calls.append(1) or torch.zeros(2, 3, 30))
    assert fused_row_entropy(q, k, causal=True) is not None and calls == [] and choice["calls"] == 1
    fused_row_entropy(q, k, causal=True, native=True)
    assert calls == [1]
    monkeypatch.setenv(native.ENV, "1")
    assert native.prefer_kernel(None) is True
    fused_row_entropy(q, k, causal=True)
    assert calls == [1, 1] and "SIGMA_CORE_NATIVE=1" in native.describe()
    fused_row_entropy(q, k, causal=True, native=False)
    assert calls == [1, 1]
    monkeypatch.setattr(native, "_choice", {"record": None})
    choice["times"] = (1.0, 2.0)
    monkeypatch.setenv(native.ENV, "0")
    assert native.prefer_kernel(None) is False and fused_row_entropy(q, k, causal=True) is not None
    assert calls == [1, 1] and choice["calls"] == 1 and "SIGMA_CORE_NATIVE=0" in native.describe()
    monkeypatch.setenv(native.ENV, "yes")
    with pytest.raises(ValueError, match="SIGMA_CORE_NATIVE must be 0, 1 or auto"):
        native.prefer_kernel(None)


def test_a_failed_build_takes_the_pytorch_path_untimed(choice, monkeypatch):
    monkeypatch.setattr(native, "_state", {"tried": True, "module": None, "error": "OSError: no compiler"})
    assert native.prefer_kernel(None) is False and choice["calls"] == 0 and not choice["file"].exists()
    assert "did not build: OSError: no compiler" in native.describe()
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    np.testing.assert_allclose(fused_row_entropy(q, k, causal=True).double().numpy(),
                               reference(q, k, 0.5, True), rtol=0, atol=1e-6)


def test_an_unwritable_cache_keeps_the_choice_in_the_process(choice, monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_choice_path", lambda: tmp_path / "missing" / native.CHOICE_FILE)
    assert native.prefer_kernel(None) is True and native.prefer_kernel(None) is True
    assert choice["calls"] == 1 and not (tmp_path / "missing").exists()


def test_the_real_timing_measures_both_paths(kernel, monkeypatch, tmp_path):
    """The actual measurement: both paths run on CHOICE_SHAPES, each best round is a positive time,
    the faster one is chosen and stored; the default path of fused_row_entropy is then that one."""
    from sigma_core import entropy as E
    monkeypatch.setattr(native, "_choice", {"record": None})
    monkeypatch.setattr(native, "_choice_path", lambda: tmp_path / native.CHOICE_FILE)
    monkeypatch.delenv(native.ENV, raising=False)
    seen = []
    dense = E._dense_row_entropy
    monkeypatch.setattr(E, "_dense_row_entropy", lambda *a: seen.append(tuple(a[0].shape)) or dense(*a))
    chose = native.prefer_kernel(E._torch_fast_path)
    rec = json.loads((tmp_path / native.CHOICE_FILE).read_text())[native._choice_key()]
    assert 0 < rec["kernel_s"] < 1 and 0 < rec["torch_s"] < 1 and chose is (rec["kernel_s"] < rec["torch_s"])
    assert set(seen) == set(native.CHOICE_SHAPES)  # the PyTorch path was timed on those shapes
    calls = []
    real = native.row_entropy
    monkeypatch.setattr("sigma_core.entropy.native_row_entropy", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    q, k = strided(2, 2, 20, 8, g), strided(2, 2, 20, 8, g)
    fused_row_entropy(q, k, causal=True)
    assert calls == ([1] if chose else [])
