"""Data-parallel training under ``torchrun``: process group, sharding, replica checks.

A run started by ``torchrun --nproc_per_node N -m sigma_core.cli train ...`` (or ``torchrun
$(which entropy-collapse) train ...``) finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU) and the
:class:`~sigma_core.experiments.train.Trainer` wraps its model in
:class:`~torch.nn.parallel.DistributedDataParallel`.

Design (what makes a run of N processes equal to one process up to reduction order):

- every rank draws the same *global* batch of ``batch_size`` windows from the shared data-order
  generator and keeps its contiguous slice of ``batch_size / N`` rows (:func:`shard`), so the
  data order, and the checkpoint that records it, is the same on every rank;
- DDP averages the gradients over ranks: with equal shards that is the gradient of the global
  mean loss, the one a single process with ``batch_size`` computes;
- sigmaReparam's power-iteration vectors ``_u``, ``_v`` are buffers: DDP broadcasts them from
  rank 0 before every training forward (``broadcast_buffers=True``), and every rank then
  advances them from the same weights, so they stay identical (:func:`replicas_agree`);
- only rank 0 writes ``config.json``, ``metrics.jsonl``, samples, checkpoints and the summary;
  the attention statistics of a logged step are those of rank 0's shard.

With ``--distributed fsdp`` the model is sharded instead (:func:`shard_model`: FSDP2
``fully_shard`` per transformer block and at the root): each rank holds a slice of every
parameter, FSDP2 gathers a block's weights in its forward and reduce-scatters the gradients,
so the gradient is again that of the global mean loss.  Every forward then needs every rank:
evaluation, attention samples and the gathered sigma/gamma of a logged step run on all ranks
(one writer still); checkpoints hold the gathered full state in the single-file format, so a
run resumes under DDP, FSDP or in one process alike.

Example
-------
>>> import torch
>>> rank_and_world()  # outside torchrun: one process
(0, 1)
>>> x = torch.arange(8).reshape(4, 2)
>>> shard(x, rank=1, world_size=2).tolist()  # rows 2..3 of the global batch
[[4, 5], [6, 7]]
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether the environment of ``torchrun`` (``WORLD_SIZE`` > 1) is present."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> torch.device | None:
    """Join the process group described by the torchrun environment; return this rank's device.

    ``device`` ``"auto"`` or ``"cuda"`` uses NCCL and ``cuda:LOCAL_RANK`` when CUDA is available,
    anything else gloo on the CPU.  Returns ``None`` (and does nothing) outside torchrun.
    """
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every transformer block (each child of an ``nn.ModuleList``
    that holds parameters), then the root; in place, returns ``model``.

    Build the optimizer afterwards (its parameters are the sharded ``DTensor`` ones).
    """
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from torch.nn.utils.parametrize import ParametrizationList  # noqa: PLC0415

    units: list[str] = []
    for name, module in model.named_modules():
        if (not isinstance(module, torch.nn.ModuleList) or isinstance(module, ParametrizationList)
                or any(name.startswith(u + ".") for u in units)):  # (blocks inside a block: one unit)
            continue
        for i, block in enumerate(module):
            if any(True for _ in block.parameters()):
                units.append(f"{name}.{i}" if name else str(i))
                fully_shard(block)
    fully_shard(model)
    return model


def is_sharded_unit(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself is an FSDP2 ``fully_shard`` unit."""
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a submodule) is an FSDP2 ``fully_shard`` unit."""
    return any(is_sharded_unit(m) for m in model.modules())


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the gathered tensor when it is a ``DTensor`` (a collective: every rank)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model state on the CPU (gathered from the shards under FSDP2: every rank
    calls it, rank 0 gets it, the others an empty dict); the keys and values of
    ``model.state_dict()`` of the unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's gathered state in the format of ``optimizer.state_dict()`` of one
    process (parameters numbered in the optimizer's order), so the same file loads anywhere
    (every rank calls it; rank 0 gets it, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: PLC0415

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if "param_groups" not in sd:  # cpu_offload: only rank 0 holds the gathered state
        return sd
    index = {fqn: i for i, fqn in enumerate(fqn for g in sd["param_groups"] for fqn in g["params"])}
    state = {index[fqn]: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for fqn, st in sd["state"].items()}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load :func:`full_model_state` / :func:`full_optimizer_state` (or the ``state_dict()`` of
    one process) into a sharded ``model`` and its ``optimizer``; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,  # noqa: PLC0415
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {order[i]: st for i, st in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def teardown() -> None:
    """Leave the process group (no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rows ``[rank * B/N, (rank + 1) * B/N)`` of a global batch ``(B, ...)``; B must divide by N."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if batch.shape[0] % world_size:
        raise ValueError(f"batch of {batch.shape[0]} rows does not split over world_size={world_size}")
    n = batch.shape[0] // world_size
    return batch[rank * n:(rank + 1) * n]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a scalar tensor over the ranks (``value`` itself in one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return value
    out = value.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world


def any_rank(flag: int) -> int:
    """The largest of an integer flag over the ranks (so every rank takes the same decision)."""
    rank, world = rank_and_world()
    if world == 1:
        return int(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def replicas_agree(module: torch.nn.Module) -> bool:
    """Whether every parameter and buffer (sigmaReparam's ``_u``, ``_v`` included) is bit-identical
    on all ranks: per-tensor float64 checksums are compared through an all-reduce of min and max
    (the shards of an FSDP2 model are gathered first: every rank calls it)."""
    rank, world = rank_and_world()
    if world == 1:
        return True
    tensors = [whole(t.detach()).double() for t in module.state_dict().values()]  # (FSDP2: gathered)
    vec = torch.stack([t.sum() for t in tensors] + [(t * t).sum() for t in tensors])
    lo, hi = vec.clone(), vec.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
