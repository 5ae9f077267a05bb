"""Data-parallel sampling: which rank this process is, and the little it needs to say to the others.

Ranks come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or SLURM (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`). When a rendezvous address is known (`MASTER_ADDR` and
`MASTER_PORT`, set by torchrun) a gloo process group carries the output directory from rank 0, a
barrier before the manifest and the list of shards each rank wrote; without one, the ranks only
share the output directory, and whichever rank finds every shard present writes the manifest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    connected: bool = False  # a torch.distributed process group links the ranks
    _owns_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.connected:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if not self.connected:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value) -> list | None:
        """Every rank's `value`, in rank order (None without a process group)."""
        if not self.connected:
            return [value] if self.world_size == 1 else None
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False
            self.connected = False


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def detect_world() -> World:
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size} (check RANK/WORLD_SIZE or SLURM_*)")
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def setup_world(connect: bool = True) -> World:
    """This process's place among the ranks, joined to a gloo group when a rendezvous is known (and `connect`)."""
    world = detect_world()
    if world.world_size == 1 or not connect:
        return world
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world.connected = True
    elif dist.is_available() and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        # gloo: only small Python objects travel (paths, shard names), whatever the device
        dist.init_process_group("gloo", rank=world.rank, world_size=world.world_size)
        world.connected = True
        world._owns_group = True
    return world
