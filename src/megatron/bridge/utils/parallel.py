"""Where this process sits in the job: the one object that knows the parallel layout.

`pretrain` builds a `ParallelLayout` once at start, from the launcher's environment and the config
(`model.tensor_model_parallel_size`), and registers it; every consumer asks `current_layout()` for its
rank, its data-parallel group or the device mesh instead of querying `torch.distributed` itself:

    world = data_parallel_size x tensor_parallel_size        mesh dims ("dp", "tp"), tp innermost

Tensor parallelism is a seat for later: its size is validated to be 1 (see `GPTModelProvider`), so
today the data-parallel group is the whole world. Outside a run (a conversion called from a user's
own script) `current_layout()` describes the process group that exists, or a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron.bridge.utils.errors import config_error

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "ParallelLayout",
    "build_layout",
    "current_layout",
    "data_parallel_size",
    "launched_world_size",
    "set_current_layout",
]


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the job: global, data-parallel and tensor-parallel ranks, groups and the mesh."""

    world_size: int
    """Processes in the job."""
    rank: int
    """This process's global rank."""
    local_rank: int
    """This process's rank on its machine (picks its GPU)."""
    device: torch.device
    """The device this rank computes on."""
    data_parallel_size: int
    """Model replicas: the global batch is split over them."""
    data_parallel_rank: int
    """Which replica this rank is (which slice of each global batch it reads)."""
    tensor_parallel_size: int = 1
    """Ranks sharing one replica's layers (1: no tensor parallelism)."""
    tensor_parallel_rank: int = 0
    """This rank's place inside its replica."""
    mesh: DeviceMesh | None = None
    """The ("dp", "tp") device mesh, None in a layout that no process group backs."""
    owns_process_group: bool = False
    """True when `pretrain` created the process group (and so must destroy it)."""

    @property
    def is_rank_zero(self) -> bool:
        """True on global rank 0 (the rank that writes shared files and prints)."""
        return self.rank == 0

    @property
    def data_parallel_group(self) -> dist.ProcessGroup | None:
        """The process group of the data-parallel replicas (None without a mesh)."""
        return None if self.mesh is None else self.mesh.get_group("dp")

    @property
    def data_parallel_mesh(self) -> DeviceMesh | None:
        """The one-dimensional mesh over the data-parallel replicas (FSDP2 shards over it)."""
        return None if self.mesh is None else self.mesh["dp"]


def data_parallel_size(world_size: int, tensor_parallel_size: int) -> int:
    """The number of replicas `world_size` processes make with `tensor_parallel_size` ranks per replica."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise config_error("model.tensor_model_parallel_size", tensor_parallel_size, "a positive integer")
    if world_size % tensor_parallel_size != 0:
        raise config_error("model.tensor_model_parallel_size", tensor_parallel_size,
                           f"a divisor of the number of processes ({world_size})")
    return world_size // tensor_parallel_size


def launched_world_size() -> int:
    """The world size the launcher announces (1 outside torchrun), known before any process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_layout(*, device: torch.device, tensor_parallel_size: int, owns_process_group: bool) -> ParallelLayout:
    """The layout of the process group that now exists, with its device mesh (tensor-parallel ranks innermost)."""
    assert dist.is_initialized(), "build_layout needs the process group"
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = data_parallel_size(world, tensor_parallel_size)
    mesh = _mesh(device, dp, tensor_parallel_size)
    return ParallelLayout(
        world_size=world, rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device,
        data_parallel_size=dp, data_parallel_rank=rank // tensor_parallel_size,
        tensor_parallel_size=tensor_parallel_size, tensor_parallel_rank=rank % tensor_parallel_size,
        mesh=mesh, owns_process_group=owns_process_group,
    )


def _mesh(device: torch.device, dp: int, tp: int) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


_current: ParallelLayout | None = None


def set_current_layout(layout: ParallelLayout | None) -> None:
    """Register the running job's layout (None: the run has ended)."""
    global _current
    _current = layout


def current_layout() -> ParallelLayout:
    """The running job's layout; outside a run, the process group that exists (or a single process)."""
    if _current is not None:
        return _current
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    return ParallelLayout(world_size=world, rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                          device=torch.device("cpu"), data_parallel_size=world, data_parallel_rank=rank)
