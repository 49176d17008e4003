"""Rank-aware printing for code that must not import the training package (the data package, say)."""

from __future__ import annotations

import torch.distributed as dist


def is_rank_zero() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print_rank_0(message: str) -> None:
    """Print on rank 0 only, flushing so that logs interleave sensibly under torchrun."""
    if is_rank_zero():
        print(message, flush=True)
