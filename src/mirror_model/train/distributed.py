"""Multi-process training under ``torchrun`` (one process per GPU, or several CPU processes).

Data parallelism as in PyTorch DDP: every rank holds a full replica (identical start: rank 0's
parameters are broadcast), takes its shard of each **global** batch (rank ``r`` gets positions
``r, r+W, r+2W, ...``), and after the backward pass gradients are averaged over ranks (one
flat all-reduce per dtype), so every replica takes the same optimiser step. The contrastive loss
gathers the other ranks' embeddings as negatives (``mirror_model.losses.clip_loss`` does this
when a process group is initialised), so the loss of a step equals the single-process loss of
the same global batch. The gradient all-reduce is explicit rather than through
``DistributedDataParallel`` so that loss terms switched off by a preset (parameters without a
gradient) need no ``find_unused_parameters`` search and the model's own methods
(``renormalize_prototypes``, ``encode_*``) stay directly reachable.

Launch: ``torchrun --nproc-per-node 4 -m mirror_model.cli pretrain ...`` (or
``mirror-train`` via ``torchrun --no-python``); multi-node as usual with ``--nnodes``/``--rdzv-*``.
Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_reduce_mean",
    "average_gradients",
    "broadcast_parameters",
    "init_distributed",
    "shard_indices",
]


@dataclass(frozen=True)
class DistContext:
    """Rank facts of this process (``world_size == 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self, sync: bool = True) -> None:
        """Destroy the process group if this context created it.

        With ``sync`` (a normal end) the ranks first meet at a barrier, so no rank closes its
        connections while another still has a collective in flight; after an error pass
        ``sync=False`` (the other ranks may never arrive). Destroying the group joins gloo's
        worker threads here, while the interpreter is alive, provided nothing else holds the
        group (see :func:`mirror_model.losses.clip_loss`, which never stores it).
        """
        if self.initialized_here and dist.is_initialized():
            if sync and self.distributed:
                dist.barrier()
            dist.destroy_process_group()


def init_distributed(device_type: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for one process).

    Uses NCCL for CUDA and gloo for CPU. Returns a :class:`DistContext`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, False)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world, local_rank, True)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Positions of a global batch of ``n`` that rank ``rank`` processes (strided, like DistributedSampler)."""
    return list(range(rank, n, world_size))


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(
    params: Iterable[torch.nn.Parameter], ctx: DistContext, weight: float = 1.0
) -> None:
    """All-reduce gradients: ``grad <- sum_ranks(weight_r * grad_r) / sum_ranks(weight_r)``.

    ``weight`` is this rank's share of the global batch (its number of samples); with equal
    shards this is the plain DDP average. Parameters without a gradient on this rank count as
    zero (and receive the average if another rank produced one).
    """
    if not ctx.distributed:
        return
    params = [p for p in params if p.requires_grad]
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    total = torch.tensor(
        [float(weight)], dtype=torch.float64, device=params[0].device if params else "cpu"
    )
    dist.all_reduce(total)
    for plist in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plist]
        flat = torch.cat([g.reshape(-1) for g in grads]) * float(weight)
        dist.all_reduce(flat)
        flat /= float(total.item())
        offset = 0
        for p in plist:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def all_reduce_mean(values: torch.Tensor, ctx: DistContext, weight: float = 1.0) -> torch.Tensor:
    """Weighted mean of ``values`` over ranks (``weight`` = this rank's sample count)."""
    if not ctx.distributed:
        return values
    buf = torch.cat(
        [
            values.detach().double().reshape(-1) * weight,
            torch.tensor([float(weight)], dtype=torch.float64, device=values.device),
        ]
    )
    dist.all_reduce(buf)
    return (buf[:-1] / buf[-1]).to(values.dtype).reshape(values.shape)
