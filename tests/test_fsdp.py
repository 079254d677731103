"""σReparam under FSDP2 (``fully_shard``) and ``torch.distributed.checkpoint``, 2 gloo processes.

A tiny Hugging Face GPT-2 (built from a config, split q/k/v: gamma (3,)) converted with
:func:`convert_to_sigma_reparam`, sharded per block and at the root, trains on halves of the
global batch; one process trains on the whole batch (tests/fsdp_worker.py has both).  FSDP2
averages the gradients over ranks, so the two runs agree up to the order of floating-point
reductions; a DCP checkpoint resumes bit-identically at the same world size and reshards 2 -> 1
and 1 -> 2 through the same ``get_state_dict``/``set_state_dict`` functions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
dcp = pytest.importorskip("torch.distributed.checkpoint")

import fsdp_worker as W  # noqa: E402  (tests/ is on sys.path under pytest)

from sigma_core.reparam import fold_sigma_reparam, sigma_reparam_report, sigma_reparam_state  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the whole global batch; its DCP checkpoint after SAVE_AT."""
    root = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    model = W.build_model()
    opt = W.optimizer(model)
    losses, states = [], []
    for step in range(1, W.STEPS + 1):
        losses.append(W.train_step(model, opt, step))
        states.append(sigma_reparam_state(model))
        if step == W.SAVE_AT:
            W.save_dcp(model, opt, root / "dcp1")
            at_save = W.full_state(model)
    return dict(root=root, losses=losses, states=states, at_save=at_save, final=W.full_state(model),
                report=sigma_reparam_report(model))


@pytest.fixture(scope="module")
def two_ranks(one_process):
    root = one_process["root"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE / "fsdp_worker.py"), str(root)], env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    seen = [json.loads((root / f"seen{r}.json").read_text()) for r in (0, 1)]
    return dict(seen=seen, rank0=torch.load(root / "rank0.pt"),
                vectors=[torch.load(root / f"vectors{r}.pt") for r in (0, 1)])


def assert_states_close(a, b, **tol):
    """Every tensor within ``tol``, except the key bias (rows d..2d of ``c_attn.bias``): its
    gradient is zero in exact arithmetic (it shifts a whole row of logits, which softmax
    ignores), and AdamW turns the rounding noise into steps of size lr in either direction."""
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("c_attn.bias"):
            key_bias = slice(32, 64)
            torch.testing.assert_close(x[key_bias], y[key_bias], rtol=0, atol=2 * W.STEPS * W.LR, msg=k)
            x, y = torch.cat([x[:32], x[64:]]), torch.cat([y[:32], y[64:]])
        torch.testing.assert_close(x, y, msg=lambda m: f"{k}: {m}", **tol)


def test_sharded_training_matches_one_process_with_the_same_sigma_and_gamma_on_every_rank(one_process, two_ranks):
    s0, s1 = two_ranks["seen"]
    np.testing.assert_allclose(s0["losses"], one_process["losses"], rtol=1e-5)
    assert s0["losses"] == s1["losses"]
    assert s0["states"] == s1["states"]  # sigma and gamma of the whole weights, bit-equal on both ranks
    for shard_state, ref in zip(s0["states"], one_process["states"]):
        assert shard_state.keys() == ref.keys()
        for k in ref:
            assert shard_state[k]["sigma"] == pytest.approx(ref[k]["sigma"], rel=1e-5), k
            assert shard_state[k]["gamma"] == pytest.approx(ref[k]["gamma"], rel=1e-5), k
    assert any(abs(s["gamma"] - s["sigma"]) > 1e-4 for s in s0["states"][-1].values())  # gamma trained
    v0, v1 = two_ranks["vectors"]
    assert len(v0) == 2 * 4 * 2  # _u and _v of the 4 projections of both blocks
    assert all(torch.equal(v0[k], v1[k]) for k in v0)
    assert_states_close(two_ranks["rank0"]["final"], one_process["final"], rtol=1e-4, atol=1e-5)
    # gamma has shape (3,) for the split c_attn, (1,) elsewhere: both shardable
    assert one_process["final"]["transformer.h.0.attn.c_attn.parametrizations.weight.0.gamma"].shape == (3,)
    assert one_process["final"]["transformer.h.0.mlp.c_fc.parametrizations.weight.0.gamma"].shape == (1,)


def test_report_works_and_folding_a_sharded_model_says_what_to_call_first(one_process, two_ranks):
    s0 = two_ranks["seen"][0]
    assert s0["report"] == one_process["report"]
    assert "full_state_dict=True" in s0["fold"] and "sharded" in s0["fold"]
    # the recipe the message gives: the gathered state, loaded into an unsharded model, folded
    model = W.build_model()
    model.load_state_dict(two_ranks["rank0"]["final"])
    model.eval()
    folded = fold_sigma_reparam(model)
    with torch.no_grad():
        logits = folded(input_ids=W.probe_input()).logits
    torch.testing.assert_close(logits, two_ranks["rank0"]["logits"], rtol=1e-5, atol=1e-5)


def test_dcp_checkpoint_resumes_bit_identically_at_the_same_world_size(one_process, two_ranks):
    s0 = two_ranks["seen"][0]
    assert s0["resumed_losses"] == s0["losses"][W.SAVE_AT:]
    assert s0["resumed_keys_equal"] and s0["resumed_equal"]
    names = dcp.FileSystemReader(str(one_process["root"] / "dcp2")).read_metadata().state_dict_metadata
    for suffix in ("0._u", "0._v", "0.gamma", "original"):  # the power-iteration vectors are saved
        assert f"model.transformer.h.1.attn.c_attn.parametrizations.weight.{suffix}" in names
    assert any(k.startswith("optim.state.") for k in names)


def test_dcp_checkpoint_reshards_two_ranks_to_one_process(one_process, two_ranks):
    model = W.build_model()
    opt = W.optimizer(model)
    W.load_dcp(model, opt, one_process["root"] / "dcp2")  # written by 2 ranks, read by 1 process
    loaded, written = W.full_state(model), two_ranks["rank0"]["at_save"]
    assert list(loaded) == list(written)
    assert [k for k in loaded if not torch.equal(loaded[k], written[k])] == []  # bit for bit
    assert_states_close(loaded, one_process["at_save"], rtol=1e-4, atol=1e-5)
    losses = [W.train_step(model, opt, s) for s in range(W.SAVE_AT + 1, W.STEPS + 1)]
    np.testing.assert_allclose(losses, one_process["losses"][W.SAVE_AT:], rtol=1e-5)


def test_dcp_checkpoint_reshards_one_process_to_two_ranks(one_process, two_ranks):
    s0 = two_ranks["seen"][0]
    loaded = two_ranks["rank0"]["from_one_loaded"]
    assert list(loaded) == list(one_process["at_save"])
    assert [k for k in loaded if not torch.equal(loaded[k], one_process["at_save"][k])] == []  # a copy, bit for bit
    np.testing.assert_allclose(s0["from_one_losses"], one_process["losses"][W.SAVE_AT:], rtol=1e-5)


@pytest.fixture(scope="module")
def compiled_ranks(tmp_path_factory):
    """``fsdp_worker.py OUT --compile``: the sharded GPT-2 uncompiled, per block compiled and compiled whole."""
    root = tmp_path_factory.mktemp("fsdp-compiled")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE / "fsdp_worker.py"), str(root), "--compile"], env=env, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    return [json.loads((root / f"compiled{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("how", ["blocks", "whole"])
def test_sharded_and_compiled_training_matches_the_uncompiled_sharded_run(compiled_ranks, two_ranks, one_process,
                                                                            how):
    """FSDP2 and torch.compile together (aot_eager, 2 gloo processes): each block compiled before
    ``fully_shard``, or the whole sharded model compiled; the losses, the gathered σ and γ and the
    power-iteration vectors are those of the uncompiled sharded run, on both ranks, and the losses
    those of one process."""
    for rank, seen in enumerate(compiled_ranks):
        assert "error" not in seen[how], seen[how]["error"]
        got, eager, vectors = seen[how], two_ranks["seen"][rank], two_ranks["vectors"][rank]
        assert got["graphs"] and all(n > 0 for n in got["graphs"])  # it did compile
        np.testing.assert_allclose(got["losses"], eager["losses"], rtol=1e-6)
        for k, ref in eager["states"][-1].items():
            assert got["state"][k]["sigma"] == pytest.approx(ref["sigma"], rel=1e-5), k
            assert got["state"][k]["gamma"] == pytest.approx(ref["gamma"], rel=1e-5), k
        assert got["vectors"].keys() == vectors.keys()
        for k, ref in vectors.items():
            np.testing.assert_allclose(got["vectors"][k], ref.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got["losses"], one_process["losses"], rtol=1e-5)
    assert compiled_ranks[0][how]["losses"] == compiled_ranks[1][how]["losses"]
