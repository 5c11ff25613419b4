"""Where each rank sits: data-parallel x context-parallel coordinates and the device mesh."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of a run (torchtitan's ``ParallelDims``, for dp x cp [x HSDP]).

    ``cp`` ranks of one group see the same batch and noise; ``replicate > 1`` is HSDP
    (replicate across groups of ``dp_world / replicate`` shards)."""

    world_size: int = 1
    rank: int = 0
    cp: int = 1
    replicate: int = 1

    def __post_init__(self) -> None:
        if self.world_size % self.cp:
            raise ValueError(f"dist.cp={self.cp} does not divide the world size {self.world_size}")
        if self.replicate > 1 and self.dp_world % self.replicate:
            raise ValueError(f"dist.replicate={self.replicate} does not divide "
                             f"{self.dp_world} dp ranks")

    @property
    def dp_world(self) -> int:
        return self.world_size // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    def build_mesh(self, device_type: str) -> Optional[Any]:
        """The device mesh: (dp, cp), or (dp_replicate, dp_shard, cp) for HSDP; None for one
        process."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        if self.replicate > 1:
            return init_device_mesh(device_type,
                                    (self.replicate, self.dp_world // self.replicate, self.cp),
                                    mesh_dim_names=("dp_replicate", "dp_shard", "cp"))
        return init_device_mesh(device_type, (self.dp_world, self.cp),
                                mesh_dim_names=("dp", "cp"))


def fsdp_mesh(mesh: Any) -> Any:
    """The mesh FSDP shards over: dp (or dp x cp flattened), 2-D (replicate, shard) for HSDP."""
    names = mesh.mesh_dim_names
    if "dp_replicate" in names:
        return mesh["dp_replicate", "dp_shard"]
    if mesh["cp"].size() > 1:
        return mesh["dp", "cp"]._flatten("dp_cp")
    return mesh["dp"]


def cp_group(mesh: Any) -> Optional[Any]:
    """The context-parallel process group, or None without CP."""
    if mesh is None or mesh["cp"].size() == 1:
        return None
    return mesh["cp"].get_group()
