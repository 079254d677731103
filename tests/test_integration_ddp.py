"""The Hugging Face ``Trainer`` callback under ``torch.distributed``: 2 gloo processes on the CPU.

tests/hf_ddp_worker.py trains a tiny GPT-2 wrapped by the ``Trainer`` in ``DistributedDataParallel``
on two ranks, each on its own share of the batches, with ``HFEntropyCallback(every=2)`` and the
``Trainer``'s own TensorBoard logger (``report_to=["tensorboard"]``).  Checked: both ranks finish
(none waits for the other: a callback that logs on one rank only, or clears ``should_log``, leaves
the ranks in different collectives), both record the same optimiser steps, the ``Trainer``'s own
loss log is kept on the steps the callback logs, and the one TensorBoard file of the run, written by
rank 0, holds rank 0's entropies, not rank 1's.  The same two processes then fit the model with
``lightning.Trainer(strategy="ddp")``, ``LightningEntropyCallback`` and a ``CSVLogger``: one
metrics file, rank 0's values.
"""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each rank's rank{r}.json and the run's folder (two processes, no launcher: the env:// variables)."""
    out = tmp_path_factory.mktemp("hf_ddp")
    # (SIGMA_CORE_NATIVE=0: the PyTorch path, no compiled kernel to build or time in each worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGMA_CORE_NATIVE": "0", "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(HERE / "hf_ddp_worker.py"), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a rank did not finish in 300 s (waiting in a collective the other rank skipped?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r}:\n{log[-4000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_both_ranks_train_under_ddp_record_the_same_steps_and_keep_the_trainers_own_log(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["ddp"]
        assert rank["forwards"] == [0, 1, 3]  # optimiser steps 1, 2, 4: the same forwards on both ranks
        entropy = {e["step"]: e for e in rank["logged"] if "entropy_min_head/all" in e}
        assert sorted(entropy) == [1, 2, 4]
        for step, scalars in zip([1, 2, 4], rank["records"]):
            assert {k: v for k, v in entropy[step].items() if k not in ("step", "epoch")} == scalars
        # logging_steps=2: the Trainer's own loss log is there on the steps the callback logs too
        assert sorted(e["step"] for e in rank["logged"] if "loss" in e) == [2, 4]
    # each rank measured its own batches
    assert ranks[0]["records"][0]["entropy_min_head/all"] != ranks[1]["records"][0]["entropy_min_head/all"]


def test_the_runs_logger_shows_rank_0s_entropies_only(two_ranks):
    out, ranks = two_ranks
    files = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert len(files) == 1  # one writer
    events = EventAccumulator(str(files[0].parent)).Reload()
    tags = events.Tags()["scalars"]
    assert "train/entropy/layer1/head1" in tags and "train/sigma/layer0/head0" in tags
    for tag in ("entropy_min_head/all", "entropy/layer0/head1", "entropy_min_head/layer1"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{tag}")]
        assert [s for s, _ in logged] == [1, 2, 4]
        for (_, value), mine, other in zip(logged, ranks[0]["records"], ranks[1]["records"]):
            assert value == pytest.approx(mine[tag], rel=1e-6)  # float32 in the event file
            assert value != pytest.approx(other[tag], rel=1e-4, abs=0)


def test_lightning_ddp_logs_rank_0s_entropies_only(two_ranks):
    # the same two processes then fit under lightning.Trainer(strategy="ddp") with a CSVLogger
    out, _ = two_ranks
    mine, other = (json.loads((out / f"lightning{r}.json").read_text()) for r in (0, 1))
    assert mine["world_size"] == other["world_size"] == 2
    files = sorted(out.glob("pl/**/metrics.csv"))
    assert len(files) == 1  # one writer
    rows = [r for r in csv.DictReader(files[0].open()) if r["entropy_min_head/all"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 3]  # optimiser steps 1, 2, 4 (Lightning's n - 1)
    for row, scalars, theirs in zip(rows, mine["records"], other["records"]):
        for tag in ("entropy_min_head/all", "entropy/layer0/head1"):  # of each rank's own batch
            assert float(row[tag]) == pytest.approx(scalars[tag], rel=1e-12)
            assert float(row[tag]) != pytest.approx(theirs[tag], rel=1e-4, abs=0)
    # sigma_h is the weights' (the same on both ranks under DDP), on the first recorded step
    assert float(rows[0]["sigma/layer1/head0"]) == pytest.approx(other["records"][0]["sigma/layer1/head0"], rel=1e-6)
