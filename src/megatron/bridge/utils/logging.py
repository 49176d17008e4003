"""Rank-aware printing, for every layer of the package."""

from __future__ import annotations

from megatron.bridge.utils.parallel import current_layout

__all__ = ["is_rank_zero", "print_rank_0"]


def is_rank_zero() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return current_layout().is_rank_zero


def print_rank_0(message: str) -> None:
    """Print on rank 0 only, flushing so that logs interleave sensibly under torchrun."""
    if is_rank_zero():
        print(message, flush=True)
