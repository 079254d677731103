"""Soak: the bound's claims on many more examples, and a long monitored training run.

Marked slow (CI still runs them; about a minute on two cores).  The property tests use their
own example counts (``SOAK_EXAMPLES``, times 4 under ``HYPOTHESIS_PROFILE=soak``); the training
run logs and checks every attention row at every step and requires the process's memory (RSS
and live Python objects) to stay flat and the bound never to be violated.
"""
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sigma_core.experiments.config import preset
from sigma_core.experiments.train import METRICS_NAME, Trainer
from theory import entropy_lower_bound, extremal_logits, row_entropy_bounds, softmax_entropy

pytestmark = pytest.mark.slow
SOAK_EXAMPLES = 1500 * (4 if os.environ.get("HYPOTHESIS_PROFILE") == "soak" else 1)
soak = settings(max_examples=SOAK_EXAMPLES, deadline=None)
finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


@soak
@given(arrays(np.float64, st.integers(1, 64), elements=finite))
def test_every_logit_row_lies_above_the_bound_of_its_centred_norm(z):
    """eq. (2): H(softmax(z)) >= h_T(||z - mean(z)||_2) for every finite row z."""
    s = np.linalg.norm(z - z.mean())
    assert softmax_entropy(z) >= entropy_lower_bound(s, z.size) - 1e-9 * max(1.0, np.log(z.size))


@soak
@given(st.floats(0, 200), st.integers(2, 4096), st.data())
def test_the_extremal_row_attains_the_bound(s, t, data):
    """eq. (5): the two-level row with centred norm s has entropy exactly h_T(s). Relative
    tolerances only (an absolute one would let h = 0 pass once h < tol, i.e. s >~ 25): the
    norm to T eps, the entropy to the error bound 4 eps (log(T-1) + g + 4) of h plus that of
    the measured entropy (~g eps: logits of size g), so 1e-14 (1 + g) relative."""
    top = data.draw(st.integers(0, t - 1))
    z = extremal_logits(s, t, top=top)
    g = s * np.sqrt(t / (t - 1))
    if s >= np.finfo(float).tiny:    # divide first: squares of entries ~1e-200 underflow
        assert np.linalg.norm((z - z.mean()) / s) == pytest.approx(1.0, rel=t * 1e-15)
    h = entropy_lower_bound(s, t)
    assert h > 0 or s > 700
    assert softmax_entropy(z) == pytest.approx(h, rel=1e-14 * (1 + g + np.log(t)), abs=1e-300)


@soak
@given(st.integers(0, 2**32 - 1), st.integers(1, 24), st.integers(1, 8), st.floats(0.01, 4.0), st.booleans())
def test_every_attention_row_respects_every_variant(seed, t, d, scale, causal):
    """eqs. (1), (7): all variants bound every row of softmax(scale X W_Q (X W_K)^T), in order."""
    rng = np.random.default_rng(seed)
    X, W_Q, W_K = rng.normal(size=(t, d)), rng.normal(size=(d, d)), rng.normal(size=(d, d))
    logits = scale * (X @ W_Q) @ (X @ W_K).T
    if causal:
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    ent = softmax_entropy(logits)
    hb = row_entropy_bounds(X, W_Q, W_K, scale=scale, causal=causal)
    # the instance bounds are rounded outward: no tolerance, and the order of eq. (7) is exact
    assert np.all(ent >= hb["exact"])
    for weak, strong in zip(("theorem", "per_query", "centered"), ("per_query", "centered", "exact")):
        assert np.all(hb[strong] >= hb[weak])


def _rss_bytes() -> int:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS read from /proc (Linux)")
def test_long_monitored_training_keeps_memory_flat_and_the_bound(tmp_path):
    steps = 240
    cfg = preset("cpu-smoke", reparam="sigma", steps=steps, log_every=1, eval_every=120, threads=1,
                 checkpoint_every=60, sample_steps=(120, steps))
    trainer = Trainer(cfg, tmp_path)
    rss, objects = {}, {}
    step_fn = trainer.train_step

    def measured(**kw):
        out = step_fn(**kw)
        if trainer.step in (130, steps - 1):  # after warm-up (first checkpoints, eval, samples) and at the end
            gc.collect()
            rss[trainer.step], objects[trainer.step] = _rss_bytes(), len(gc.get_objects())
        return out

    trainer.train_step = measured
    summary = trainer.run()
    records = [json.loads(x) for x in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # monitored at every step
    assert summary["bound_violations"] == 0 and not summary["diverged"]
    assert all(r["bound_violations"] == 0 and r["rows_checked"] > 0 for r in records)
    growth = rss[steps - 1] - rss[130]
    print(f"RSS {rss[130] / 2**20:.1f} -> {rss[steps - 1] / 2**20:.1f} MiB, objects {objects}")
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {steps - 131} monitored steps"
    # a leak of one object per step would add ~110; a leaked record per step far more
    assert objects[steps - 1] - objects[130] < 50, objects
