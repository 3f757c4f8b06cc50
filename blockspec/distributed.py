"""torchrun support for `blockspec train` and `blockspec bench`: the process group from the environment and the
few collectives they need.

One process per GPU (`torchrun --nproc-per-node K -m blockspec train|bench ...`). Training replicates the frozen
target on every rank and wraps the draft in DDP or FSDP2; the benchmark shards its prompts over the ranks and
gathers the records. Without WORLD_SIZE > 1 everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from blockspec.errors import BlockspecError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.enabled and _joined() else None

    def shard(self, items: list) -> list:
        """This rank's items: those whose index i has i % world == rank."""
        return items[self.rank::self.world]


def init_from_env(device: str) -> tuple[DistInfo, str]:
    """Join the process group torchrun describes and return it with this rank's device: NCCL on cuda:LOCAL_RANK
    for a CUDA `device`, gloo on the CPU. One process: no group, `device` unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise BlockspecError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if torch.cuda.device_count() <= local:
            raise BlockspecError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not _joined():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return DistInfo(rank=rank, world=dist.get_world_size()), device


def _joined() -> bool:
    """Whether this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def current() -> DistInfo:
    return DistInfo(dist.get_rank(), dist.get_world_size()) if _joined() else DistInfo()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _joined():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not _joined():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (e.g. 'the time budget is spent')."""
    if not _joined():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if _joined():
        dist.barrier()


def shutdown() -> None:
    if _joined():
        dist.destroy_process_group()
