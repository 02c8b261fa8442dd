"""Several processes (GPUs, machines) through torch.distributed, as `torchrun` launches them.

    torchrun --nproc_per_node=4 -m anml_fast meta-train --tasks 4 ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
             --nproc_per_node=8 -m anml_fast evaluate runs/anml ...

`init_from_env` joins the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK and the
rendezvous variables): NCCL when the run's device is CUDA, gloo on the CPU. Without those
variables, or with a world of one, everything runs as a single process and `Dist()` says so.

How the work is split (the design, so that results do not depend on the world size):
  - meta-training: every rank draws the same full batch of `--tasks` tasks from the same device
    generator (sampling is a few kernels) and meta-trains on its own contiguous share; the
    meta-gradients are averaged with one all-reduce, and every rank takes the same Adam step. The
    checkpoint is the single-process one, so `--resume` works with any world size.
  - evaluation: the trajectories of a class count are dealt round-robin; every rank still draws
    every trajectory's random numbers, in order, so each trajectory gets the ones it would get in a
    single process; the accuracies are gathered on every rank.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .errors import AnmlFastError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (n must divide evenly)."""
        if n % self.world:
            raise AnmlFastError(f"{n} tasks per meta-step cannot be split evenly over {self.world} processes "
                                f"(pass --tasks as a multiple of the world size)")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def mine(self, i: int) -> bool:
        """Round-robin ownership of item i."""
        return i % self.world == self.rank

    # -- collectives (no-ops in a single process) ------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average the tensors over the ranks, in place, with one all-reduce of a flat buffer."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat.div_(self.world)
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        if self.enabled:
            torch.distributed.all_reduce(tensor)

    def from_main(self, fn):
        """fn() run on rank 0 only, its result on every rank; an AnmlFastError there is raised on
        every rank (instead of leaving the others waiting in their next collective)."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except AnmlFastError as e:
                error = str(e)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise AnmlFastError(error)
        return result

    def broadcast_object(self, obj):
        """Rank 0's obj, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        if self.enabled:
            for t in tensors:
                torch.distributed.broadcast(t, src=0)

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def check_identical(self, params: dict[str, torch.Tensor], what: str = "weights") -> None:
        """Raise if the ranks' tensors differ (they must stay bit-identical: same Adam step)."""
        if not self.enabled:
            return
        from .checkpoint import digest

        prints = self.all_gather_object(digest(params)[:16])  # SHA-256 of every byte (on the CPU)
        if any(p != prints[0] for p in prints):
            raise AnmlFastError(f"the {what} differ between processes (SHA-256 prefixes {prints}); the run is no "
                                f"longer one model. Resume from the last checkpoint; if it recurs, check that "
                                f"every process runs the same code and settings")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def init_from_env(device: str) -> tuple[Dist, str]:
    """Join torchrun's process group if there is one; returns (Dist, this process's device)."""
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        return Dist(), device
    rank, local_rank = _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise AnmlFastError(f"process with LOCAL_RANK {local_rank} has no GPU of its own "
                                f"({torch.cuda.device_count()} visible): use --nproc_per_node <= the GPU count")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
            **({"device_id": torch.device(device)} if cuda else {}))
    return Dist(rank=rank, world=world, local_rank=local_rank), device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
