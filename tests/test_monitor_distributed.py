"""EntropyMonitor on replicated (DDP) and sharded (FSDP2) models, 2 gloo processes on the CPU.

Each rank records its own slice of the batch and must get, head for head, the records one
process gets for the same model and slice: every attention layer and head once per forward,
entropies to float tolerance, ``sigma_h`` and the bounds from whole weights.  Under FSDP2 with
the projections sharded as units of their own (resharded before attention runs) the weights at
the call are shards: the monitor copies them whole in each projection's own forward (on the
forwards that check the bound; sigma_core/whole_weights.py), whether it was attached before or
after ``fully_shard``, and holds one layer's copies at a time, none after the forward.  Without
the copies, reading a shard is refused: the entropies and the exact bound are recorded, ``sigma_h``
and the weight-based bounds left out with a note, never a shard's value.  The monitor makes no
collective, so ranks recording different forwards never wait on each other (the worker's gloo
timeout turns a wait into a failure).  Only rank 0 writes the ``path`` file; ``JsonlSink(...,
per_rank=True)`` writes one file per rank.  The worker is tests/monitor_dist_worker.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")

import monitor_dist_worker as W  # noqa: E402  (tests/ is on sys.path under pytest)

from sigma_core.capture import SHARDED  # noqa: E402

HERE = Path(__file__).resolve().parent
EXACT = ("step", "layer", "name", "source", "head", "seq_len", "n_rows", "rows_no_key", "bound_rows",
         "weight_bound_note", "violations_theorem", "violations_per_query", "violations_centered",
         "violations_exact")
CLOSE = ("entropy_mean", "entropy_mean_half", "entropy_min", "entropy_max", "sigma", "logit_norm_max",
         "bound_theorem", "bound_per_query", "bound_centered", "bound_exact")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("monitor_dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE / "monitor_dist_worker.py"), str(out)], env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process():
    """What one process records for each model on each rank's slice."""
    return {(kind, sigma): [W.record_once(W.build_model(kind, sigma), kind, W.batch(0, r, 2)) for r in (0, 1)]
            for kind in ("gpt", "gpt2") for sigma in (False, True)}


def assert_same_records(got, ref, what):
    assert [(r["layer"], r["head"]) for r in got] == [(r["layer"], r["head"]) for r in ref], what
    for g, r in zip(got, ref):
        for key in EXACT:
            assert g[key] == r[key], f"{what} layer {r['layer']} head {r['head']}: {key}"
        for key in CLOSE:
            if r[key] is None:
                assert g[key] is None, f"{what} layer {r['layer']} head {r['head']}: {key}"
            else:
                assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-5), f"{what} {r['layer']}/{r['head']}: {key}"


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_each_rank_records_every_head_once_as_one_process_does_with_whole_weights(two_ranks, one_process, how):
    _, seen = two_ranks
    for kind in ("gpt", "gpt2"):
        for sigma in (False, True):
            ref = one_process[kind, sigma]
            assert ref[0]["records"] != ref[1]["records"]  # the ranks' slices differ
            for rank in (0, 1):
                got = seen[rank][f"{how}/{kind}/{sigma}"]
                what = f"{how} {kind} sigma={sigma} rank {rank}"
                assert got["skipped"] == [] and got["warnings"] == [], what
                recs = got["records"]
                # 2 attention layers x 4 heads, each once, every record from the forward's own step
                assert sorted((r["layer"], r["head"]) for r in recs) == [(l, h) for l in (0, 1) for h in range(4)]
                assert {r["step"] for r in recs} == {0}
                assert all(r["sigma"] is not None and r["bound_theorem"] is not None for r in recs), what
                assert all(r[f"violations_{v}"] == 0 for r in recs for v in ("theorem", "per_query", "exact"))
                assert_same_records(recs, ref[rank]["records"], what)  # names as in one process (DDP unwrapped)


def unit_bytes(kind: str, sigma: bool) -> int:
    """Bytes of the parameters of one layer's projections that run before its attention call:
    q, k, v of the GPT, c_attn of GPT-2 (the output projection runs after it)."""
    att = W.blocks(W.build_model(kind, sigma))[0].attn
    mods = (att.q_proj, att.k_proj, att.v_proj) if kind == "gpt" else (att.c_attn,)
    return sum(p.nbytes for m in mods for p in m.parameters())


@pytest.mark.parametrize("how", ["fsdp_proj", "fsdp_proj_early"])
def test_projections_sharded_on_their_own_give_sigma_from_their_whole_weights(two_ranks, one_process, how):
    _, seen = two_ranks
    cases = one_process if how == "fsdp_proj" else {c: one_process[c] for c in W.EARLY}
    for (kind, sigma), ref in cases.items():
        for rank in (0, 1):
            got = seen[rank][f"{how}/{kind}/{sigma}"]
            what = f"{how} {kind} sigma={sigma} rank {rank}"
            assert got["skipped"] == [] and got["warnings"] == [], what
            assert all(r["sigma"] is not None and r["weight_bound_note"] is None for r in got["records"]), what
            assert_same_records(got["records"], ref[rank]["records"], what)
            # the copies: one layer's q/k(/v) projections at a time, none alive after the forward
            assert got["alive_bytes"] == got["peak_bytes"] == unit_bytes(kind, sigma), what
            assert got["copies"] > 0 and got["held_bytes"] == 0 and got["alive"] == 0, what


def test_weights_still_shards_at_the_call_give_the_entropies_and_no_shard_sigma(two_ranks, one_process):
    """The fallback (no whole copies: a hook order that would leave shards): reading them is refused."""
    _, seen = two_ranks
    for kind, sigma in W.NOSTASH:
        for rank in (0, 1):
            got = seen[rank][f"fsdp_proj_nostash/{kind}/{sigma}"]
            assert got["skipped"] == [] and got["warnings"] == [], (kind, sigma, rank)
            want = [dict(r, weight_bound_note=SHARDED, sigma=None, bound_theorem=None, bound_per_query=None,
                         bound_centered=None, violations_theorem=None, violations_per_query=None,
                         violations_centered=None) for r in one_process[kind, sigma][rank]["records"]]
            assert_same_records(got["records"], want, f"fsdp_proj_nostash {kind} sigma={sigma} rank {rank}")
            assert all(r["bound_exact"] is not None and r["violations_exact"] == 0 for r in got["records"])


def test_ranks_recording_different_forwards_never_wait_on_each_other(two_ranks):
    _, seen = two_ranks
    for how, kind, sigma in W.SCHEDULES:
        key = f"schedules/{how}/{kind}/{sigma}"
        # rank 0: every forward; rank 1: only the one asked with record_next(); then every 2nd
        # forward, rank 1's monitor attached one forward later (each counts its own forwards)
        assert seen[0][key]["asked"] == [[0], [1], [2]], key
        assert seen[1][key]["asked"] == [[1]], key
        assert seen[0][key]["phases"] == seen[1][key]["phases"] == [[0], [2]], key


def test_the_path_file_is_written_by_rank_0_and_per_rank_sinks_by_every_rank(two_ranks):
    out, seen = two_ranks
    lines = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    r0, r1 = seen[0]["jsonl"], seen[1]["jsonl"]
    assert len(r0) == len(r1) == 8 and r0 != r1
    assert lines("shared.jsonl") == r0  # rank 1 opened the same path and wrote nothing
    assert lines("rank0.jsonl") == r0
    assert lines("rank1.jsonl") == r1
