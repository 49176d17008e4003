"""The process group and the parallel layout: made when `pretrain` starts, undone when it ends.

`initialize` makes sure a process group exists (an in-memory one of world size 1 outside `torchrun`,
so `torch.distributed.get_rank()` works inside callbacks either way), picks this rank's device and
builds the `ParallelLayout` (`megatron.bridge.utils.parallel`) every other component asks for its
ranks, groups and mesh. `teardown` destroys the group only if `initialize` created it.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron.bridge.training.config import DistributedInitConfig
from megatron.bridge.utils.parallel import ParallelLayout, build_layout, set_current_layout

__all__ = ["initialize", "teardown"]


def initialize(config: DistributedInitConfig, *, tensor_parallel_size: int = 1) -> ParallelLayout:
    """Make sure a process group exists, pick this rank's device, and register the run's layout."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        backend = config.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(minutes=config.distributed_timeout_minutes)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        else:
            # A single process needs no rendezvous: an in-memory store avoids claiming a port.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    layout = build_layout(device=device, tensor_parallel_size=tensor_parallel_size, owns_process_group=owns)
    set_current_layout(layout)
    return layout


def teardown(layout: ParallelLayout | None) -> None:
    """Forget the run's layout and destroy the process group if `initialize` created it."""
    set_current_layout(None)
    if layout is not None and layout.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
