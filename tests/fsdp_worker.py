"""σReparam under FSDP2 and distributed checkpoints: helpers and the ``torchrun`` worker of tests/test_fsdp.py.

The model is Hugging Face's GPT-2 built from a config (tests/thirdparty_models.py, dropout 0),
converted with :func:`convert_to_sigma_reparam` (split q/k/v: gamma (3,); ``Conv1D`` weights,
normalised along dim 1).  The global batch of every step is drawn from one generator; a rank of
N trains on its contiguous slice of ``GLOBAL_BATCH / N`` rows, so the mean of the ranks' losses
is the one-process loss of the whole batch.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT``: trains
``STEPS`` steps sharded per block and at the root, saving a DCP checkpoint after step ``SAVE_AT``;
resumes a fresh sharded model from it and trains the rest again; loads the one-process
checkpoint ``OUT/dcp1`` (written beforehand by the test) into a fresh sharded model; and writes
what it saw under ``OUT`` for the test to compare.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 5
SAVE_AT = 2
GLOBAL_BATCH = 4
SEQ = 12
LR = 3e-3


def build_model() -> torch.nn.Module:
    """The converted tiny GPT-2, identical in every process (seeded)."""
    from sigma_core.reparam import convert_to_sigma_reparam
    from thirdparty_models import tiny_gpt2

    model, _ = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return convert_to_sigma_reparam(model)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` per transformer block, then the root (the FSDP2 recipe of torchtitan)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def global_batch(step: int) -> torch.Tensor:
    """Token ids ``(GLOBAL_BATCH, SEQ)`` of ``step`` (1-based), the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 97, (GLOBAL_BATCH, SEQ), generator=g)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


def train_step(model, opt, step: int, rank: int = 0, world: int = 1) -> float:
    """One step on this process's slice of the global batch; returns the global mean loss."""
    x = global_batch(step).chunk(world)[rank]  # (GLOBAL_BATCH / world, SEQ)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


def full_state(model) -> dict:
    """The whole (gathered) model state on the CPU, the same function in any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}  # (unsharded CPU tensors come back as they are)


def save_dcp(model, opt, path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_dcp(model, opt, path) -> None:
    """Restore model and optimizer from a DCP checkpoint written by any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def probe_input() -> torch.Tensor:
    return torch.arange(2 * SEQ).reshape(2, SEQ) % 97


def main(out: str) -> None:
    import torch.distributed as dist

    from sigma_core.reparam import fold_sigma_reparam, sigma_reparam_report, sigma_reparam_state

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    seen: dict = {"rank": rank, "world": world}

    model = shard_model(build_model())
    opt = optimizer(model)
    losses, states = [], []
    for step in range(1, STEPS + 1):
        losses.append(train_step(model, opt, step, rank, world))
        states.append(sigma_reparam_state(model))  # gathered: every rank, whole weights
        if step == SAVE_AT:
            save_dcp(model, opt, os.path.join(out, "dcp2"))
            at_save = full_state(model)
    seen.update(losses=losses, states=states, report=sigma_reparam_report(model))
    local = {k: v for k, v in model.state_dict().items() if k.endswith(("._u", "._v"))}
    torch.save(local, os.path.join(out, f"vectors{rank}.pt"))  # buffers: replicated, not sharded
    final = full_state(model)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    try:
        fold_sigma_reparam(model)
        seen["fold"] = "folded a sharded model"
    except ValueError as exc:
        seen["fold"] = str(exc)

    resumed = shard_model(build_model())
    opt2 = optimizer(resumed)
    load_dcp(resumed, opt2, os.path.join(out, "dcp2"))
    seen["resumed_losses"] = [train_step(resumed, opt2, s, rank, world) for s in range(SAVE_AT + 1, STEPS + 1)]
    seen["resumed_equal"] = all(torch.equal(a, b) for a, b in zip(final.values(), full_state(resumed).values()))
    seen["resumed_keys_equal"] = list(final) == list(full_state(resumed))

    from_one = shard_model(build_model())
    opt3 = optimizer(from_one)
    load_dcp(from_one, opt3, os.path.join(out, "dcp1"))
    loaded = full_state(from_one)
    seen["from_one_losses"] = [train_step(from_one, opt3, s, rank, world) for s in range(SAVE_AT + 1, STEPS + 1)]
    if rank == 0:
        torch.save({"final": final, "at_save": at_save, "logits": logits, "from_one_loaded": loaded}, os.path.join(out, "rank0.pt"))
    with open(os.path.join(out, f"seen{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()




def compiled_main(out: str) -> None:
    """``fsdp_worker.py OUT --compile``: the sharded model of :func:`main` trained ``STEPS`` steps
    with each block compiled (``block.compile()`` before ``fully_shard``) and with the whole
    sharded model compiled (``torch.compile(model)``), backend ``aot_eager`` (the uncompiled
    sharded run is :func:`main`'s); writes
    the losses, the gathered σ/γ and the number of graphs compiled of each to
    ``OUT/compiled{rank}.json``."""
    import torch.distributed as dist
    from torch._dynamo.backends.registry import lookup_backend

    from sigma_core.reparam import sigma_reparam_state

    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # aot_eager, counting the graphs
        graphs.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    seen: dict = {}
    for how in ("blocks", "whole"):
        torch._dynamo.reset()
        graphs.clear()
        model = build_model()
        if how == "blocks":
            for block in model.transformer.h:
                block.compile(backend=backend)
        model = shard_model(model)
        opt = optimizer(model)
        run = torch.compile(model, backend=backend) if how == "whole" else model
        try:
            losses = [train_step(run, opt, step, rank, world) for step in range(1, STEPS + 1)]
            vectors = {k: v.tolist() for k, v in model.state_dict().items() if k.endswith(("._u", "._v"))}
            seen[how] = {"losses": losses, "state": sigma_reparam_state(model), "graphs": list(graphs),
                         "vectors": vectors}
        except Exception as exc:  # noqa: BLE001  (the test reports what broke)
            seen[how] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    with open(os.path.join(out, f"compiled{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["--compile"]:
        compiled_main(sys.argv[1])
    else:
        main(sys.argv[1])
