"""The entropy monitor on replicated (DDP) and sharded (FSDP2) models: helpers and the ``torchrun``
worker of tests/test_monitor_distributed.py.

Models: the project's GPT and Hugging Face's GPT-2 (tests/thirdparty_models.py), tiny, with and
without sigmaReparam, built identically in every process (seeded).  Each rank feeds its own slice
of one global batch; the test measures the same model on the same slice in one process.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/monitor_dist_worker.py OUT``;
every rank writes what its monitors recorded to ``OUT/rank{rank}.json`` (and the JSON-lines files
of the sink checks under ``OUT``).  The gloo timeout is short (``TIMEOUT_S``), so a rank left
waiting in a collective fails the run instead of hanging it.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import warnings
import weakref

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GLOBAL_BATCH = 4
SEQ = 12
TIMEOUT_S = 60
#: (wrapping, model, sigmaReparam) of the comparison with one process
CASES = [(how, kind, sigma) for how in ("ddp", "fsdp", "fsdp_proj") for kind in ("gpt", "gpt2")
         for sigma in (False, True)]
#: (model, sigmaReparam) of the projections sharded on their own with the monitor attached before
#: ``fully_shard`` ("fsdp_proj_early"), and with the copies of the whole weights switched off
#: ("fsdp_proj_nostash": the fallback, weights read from shards are refused: SHARDED)
EARLY = [("gpt", True), ("gpt2", False)]
NOSTASH = [("gpt", False), ("gpt2", True)]
#: (wrapping, model, sigmaReparam) of the different recording schedules; the GPT without sigmaReparam
#: with shards at the call is the case where reading the weights (DTensor arithmetic) used to start
#: a collective on the recording rank alone (gloo: "Is there a distributed collective mismatch")
SCHEDULES = [("fsdp", "gpt2", True), ("fsdp_proj", "gpt", False), ("fsdp_proj_nostash", "gpt", False),
             ("ddp", "gpt", True)]
#: the monitor's options: every head, every row, the bound on every record; the pure-torch entropy path
OPTIONS = dict(bound_every=1, bound_samples=None, native=False)


def build_model(kind: str, sigma: bool) -> nn.Module:
    """The project's GPT (``"gpt"``) or HF GPT-2 (``"gpt2"``): 2 layers, 4 heads, d=32, dropout 0."""
    from sigma_core.models.gpt import GPT, ModelConfig
    from sigma_core.reparam import convert_to_sigma_reparam

    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(ModelConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, block_size=16))
    else:
        from thirdparty_models import tiny_gpt2

        model, _ = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if sigma:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's tied lm_head is left as it is (and says so)
            model = convert_to_sigma_reparam(model)
    return model.train()


def blocks(model: nn.Module):
    return model.blocks if hasattr(model, "blocks") else model.transformer.h


def projections(model: nn.Module):
    """The attention projections: q/k/v/o of the GPT, c_attn/c_proj of GPT-2."""
    for block in blocks(model):
        att = block.attn
        yield from ((att.q_proj, att.k_proj, att.v_proj, att.o_proj) if hasattr(att, "q_proj")
                    else (att.c_attn, att.c_proj))


def wrap(model: nn.Module, how: str) -> nn.Module:
    """``"ddp"``: DistributedDataParallel; ``"fsdp"``: ``fully_shard`` per block, then the root;
    ``"fsdp_proj"``: every attention projection its own unit, then each block, then the root
    (the projections are resharded before attention runs)."""
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    if how.startswith("fsdp_proj"):
        for proj in projections(model):
            fully_shard(proj)
    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def batch(step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's slice ``(GLOBAL_BATCH / world, SEQ)`` of the global batch of ``step``."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 97, (GLOBAL_BATCH, SEQ), generator=g).chunk(world)[rank]


def loss_of(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "gpt":
        return model(x, x)[1]
    return model(input_ids=x, labels=x).loss


def record_once(model: nn.Module, kind: str, x: torch.Tensor, how: str | None = None, **options) -> dict:
    """One training forward and backward of ``model`` on ``x`` with a monitor recording it; with
    ``how``, ``model`` is wrapped (:func:`wrap`) after the monitor is attached when ``how`` is
    ``"fsdp_proj_early"``, before it otherwise.  Also: the most bytes of whole-weight copies the
    monitor says it held and the most that were alive (weak references, seen in each unit's hook),
    how many it holds after the forward and how many copies are still alive then."""
    from sigma_core.monitor import EntropyMonitor
    from sigma_core.whole_weights import WholeWeights

    copies, alive_bytes = [], [0]
    unit_hook = WholeWeights._on_unit

    def spy(self, att, unit, args, output):  # weak references to every copy taken; the bytes alive
        if how == "fsdp_proj_nostash":
            return  # the fallback: no copies (reads of the shards are refused)
        unit_hook(self, att, unit, args, output)
        copies.extend(weakref.ref(c) for kept in self._stash.values() for _, _, c in kept.values())
        alive = {id(t): t for t in (r() for r in copies) if t is not None}  # every copy not yet freed
        alive_bytes[0] = max(alive_bytes[0], sum(t.nbytes for t in alive.values()))
        del alive

    WholeWeights._on_unit = spy
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if how is not None and how != "fsdp_proj_early":
                model = wrap(model, how)
            with EntropyMonitor(model, every=1, **OPTIONS, **options) as mon:
                if how == "fsdp_proj_early":
                    model = wrap(model, how)
                loss_of(model, kind, x).backward()
                held, peak = mon._whole.held_bytes, mon._whole.peak_bytes
    finally:
        WholeWeights._on_unit = unit_hook
    gc.collect()
    return dict(records=mon.last, skipped=mon.skipped, peak_bytes=peak, held_bytes=held,
                alive_bytes=alive_bytes[0], copies=len(copies), alive=sum(r() is not None for r in copies),
                warnings=[str(w.message) for w in seen if "EntropyMonitor" in str(w.message)])


def train(model, kind, steps, rank, world, ask=(), **options) -> list[list[int]]:
    """``steps`` optimiser steps with a monitor (``options``) attached for them, and
    ``record_next()`` before the steps in ``ask``; the ``step`` fields of each forward it recorded."""
    from sigma_core.monitor import EntropyMonitor
    from sigma_core.sinks import MemorySink

    history = MemorySink()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with EntropyMonitor(model, sinks=[history], **OPTIONS, **options) as mon:
        for step in range(steps):
            if step in ask:
                mon.record_next()
            loss_of(model, kind, batch(step, rank, world)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [sorted({r["step"] for r in recs}) for recs in history.history]


def main(out: str) -> None:
    import torch.distributed as dist

    from sigma_core.monitor import EntropyMonitor
    from sigma_core.sinks import JsonlSink

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    seen: dict = {"rank": rank}

    # 1. each rank's records of its own slice, under DDP, FSDP2 per block, FSDP2 per projection
    cases = CASES + [("fsdp_proj_early", *c) for c in EARLY] + [("fsdp_proj_nostash", *c) for c in NOSTASH]
    for how, kind, sigma in cases:
        seen[f"{how}/{kind}/{sigma}"] = record_once(build_model(kind, sigma), kind, batch(0, rank, world), how)

    # 2. ranks recording different forwards: no rank waits on another (FSDP2 runs every forward on
    # every rank; the monitor adds no collective). Rank 0 records every forward, rank 1 none but the
    # one it asks for; then every 2nd forward with rank 1 a forward behind (its monitor attached late).
    from sigma_core.whole_weights import WholeWeights

    unit_hook = WholeWeights._on_unit
    for how, kind, sigma in SCHEDULES:
        model = wrap(build_model(kind, sigma), how)
        if how == "fsdp_proj_nostash":  # no copies: every weight read meets shards, and is refused
            WholeWeights._on_unit = lambda *a: None
        try:
            asked = train(model, kind, 3, rank, world, every=1 if rank == 0 else None,
                          ask=(1,) if rank == 1 else ())
            if rank == 1:
                loss_of(model, kind, batch(9, rank, world)).backward()  # one forward the other rank does later
            phases = train(model, kind, 4, rank, world, every=2)
            if rank == 0:
                loss_of(model, kind, batch(9, rank, world)).backward()
        finally:
            WholeWeights._on_unit = unit_hook
        seen[f"schedules/{how}/{kind}/{sigma}"] = dict(asked=asked, phases=phases)

    # 3. the JSON lines: one file written by rank 0 (the default), and one file per rank
    model = wrap(build_model("gpt2", True), "fsdp")
    shared, mine = os.path.join(out, "shared.jsonl"), os.path.join(out, "rank{rank}.jsonl")
    with EntropyMonitor(model, every=1, path=shared, sinks=[JsonlSink(mine, per_rank=True)], **OPTIONS) as mon:
        loss_of(model, "gpt2", batch(0, rank, world)).backward()
    seen["jsonl"] = mon.last

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
