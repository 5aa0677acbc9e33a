"""Worker for tests/test_distributed.py, started by ``torch.distributed.run`` (2 CPU processes, gloo).

Each rank embeds its slice of one global batch with a DDP-wrapped toy model, computes the
gathered CLIP loss on its local rows, and back-propagates (DDP averages the gradients). Rank 0
then computes the single-process loss and gradients on the whole global batch and writes both to
a JSON file for the test to compare.

usage: python -m torch.distributed.run --standalone --nproc-per-node 2 _dist_worker_clip.py OUT.json "4,4;5,2"
(one result per ';'-separated split of the global batch over the ranks)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

# DistributedDataParallel imports torch.distributed.nn lazily; imported after init_process_group,
# its functions capture the WORLD group in default arguments, which keeps the group (and gloo's
# threads) alive past destroy_process_group into interpreter shutdown. Import it first.
import torch.distributed.nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mirror_model.losses import clip_loss


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.slide = nn.Linear(6, 4)
        self.rna = nn.Linear(5, 4)
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, xa: torch.Tensor, xb: torch.Tensor):
        return self.slide(xa), self.rna(xb), self.t.exp()


def run_case(sizes: list[int]) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert len(sizes) == world
    torch.manual_seed(0)  # identical model and data on every rank
    model = Toy().double()
    xa = torch.randn(sum(sizes), 6, dtype=torch.float64)
    xb = torch.randn(sum(sizes), 5, dtype=torch.float64)
    reference = Toy().double()
    reference.load_state_dict(model.state_dict())

    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    ddp = DistributedDataParallel(model)
    ea, eb, s = ddp(xa[local], xb[local])
    loss = clip_loss(ea, eb, s)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gathered = {n: [torch.zeros_like(g) for _ in range(world)] for n, g in grads.items()}
    for n, g in grads.items():
        dist.all_gather(gathered[n], g)
    if rank != 0:
        return None
    ra, rb, rs = reference(xa, xb)
    ref_loss = clip_loss(ra, rb, rs, gather=False)  # single process, global batch
    ref_loss.backward()
    max_diff = 0.0
    ranks_agree = 0.0
    for n, p in reference.named_parameters():
        max_diff = max(max_diff, (grads[n] - p.grad).abs().max().item())
        ranks_agree = max(ranks_agree, (gathered[n][0] - gathered[n][1]).abs().max().item())
    return {
        "sizes": sizes,
        "mean_loss": mean_loss.item(),
        "ref_loss": ref_loss.item(),
        "max_grad_diff": max_diff,
        "ranks_grad_diff": ranks_agree,
        "ref_grad_abs_sum": sum(p.grad.abs().sum().item() for p in reference.parameters()),
        "world": world,
    }


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc/self/task/*/comm)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                name = fh.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names


def main() -> None:
    out_path, cases = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = [run_case([int(v) for v in case.split(",")]) for case in cases.split(";")]
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()
    # the group is gone only if nothing still holds it: its threads must have been joined here,
    # not left to interpreter shutdown
    with open(f"{out_path}.rank{rank}.threads", "w") as fh:
        json.dump(gloo_threads(), fh)


if __name__ == "__main__":
    main()
