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
    on all ranks: per-tensor float64 checksums are compared through an all-reduce of min and max."""
    rank, world = rank_and_world()
    if world == 1:
        return True
    tensors = [t.detach().double() for t in module.state_dict().values()]
    vec = torch.stack([t.sum() for t in tensors] + [(t * t).sum() for t in tensors])
    lo, hi = vec.clone(), vec.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
