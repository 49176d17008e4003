"""Weighted blends of several datasets, sample by sample, in Megatron-LM's order.

Megatron's greedy rule decides which dataset serves each sample: sample i goes to the dataset d
with the largest error `weight[d] * max(i, 1) - count[d]` (counts of the samples before i, in
float64; ties to the lower index), and is that dataset's sample `count[d]`. Every prefix of the
blend therefore holds each dataset within about one sample of its share, and each component is
read in its own (shuffled) order, only as far as the blend needs.

The rule is sequential, so it is computed in blocks side by side: every block but the first starts
a little early from the counts the weights predict, and such a start soon falls into the exact
sequence (the counts agree from some sample on, and then the rest of the block is exact). Each
block's counts where it begins are compared with the counts where the block before it ends; a
block that disagrees is computed again from those, until all agree. The result is therefore
exactly the sequential one; it costs about 0.1 s (2 datasets) to 0.4 s (8) per million samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["BlendedDataset", "blend_consistency", "build_blend_indices"]

_BLOCK = 2048
_MIN_WARMUP = 64
_GROUP_SAMPLES = 1 << 24  # samples recorded at a time before they are moved into the result


def build_blend_indices(
    weights: list[float], num_samples: int, *, block: int = _BLOCK, warmup: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each blended sample: which dataset serves it (int16), and which of that dataset's samples (int64).

    `weights` are used as given (normalise them first, as Megatron does). `block` (samples per block)
    and `warmup` (steps each block starts early; by default enough for the rarest dataset) only
    change the speed: the result never depends on them.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"blend weights {weights} must be finite and non-negative")
    assert w.size < np.iinfo(np.int16).max, "the dataset index is int16"
    if num_samples == 0 or w.size == 1:
        return np.zeros(num_samples, dtype=np.int16), np.arange(num_samples, dtype=np.int64)
    positive = w[w > 0]
    # A block must be long enough for a rare dataset's count to settle after a predicted start.
    if warmup is None:
        warmup = _MIN_WARMUP if positive.size == 0 else max(_MIN_WARMUP, math.ceil(4 / positive.min()))
    length = min(max(block, warmup), num_samples)
    starts = np.arange(0, num_samples, length, dtype=np.int64)
    # Block b's picks fill row b; the padding after the last sample is cut off at the end.
    dataset_index = np.zeros(len(starts) * length, dtype=np.int16)
    dataset_sample_index = np.zeros(len(starts) * length, dtype=np.int64)
    picks, taken = dataset_index.reshape(len(starts), length), dataset_sample_index.reshape(len(starts), length)
    # Counts are kept per dataset across blocks, [k, blocks], so each step works on whole rows.
    ends = np.zeros((w.size, len(starts)), dtype=np.float64)
    begins = np.zeros_like(ends)  # the counts each block was computed from, at its first sample

    ends[:, :1] = _run_recorded(w, starts[:1], np.zeros((w.size, 1)), length, picks[:1], taken[:1])
    if len(starts) > 1:
        early = starts[1:] - warmup
        counts = _run(w, early, _predicted_counts(w, early), warmup)
        begins[:, 1:] = counts
        ends[:, 1:] = _run_recorded(w, starts[1:], counts.copy(), length, picks[1:], taken[1:])
    while len(wrong := 1 + np.flatnonzero(np.any(begins[:, 1:] != ends[:, :-1], axis=0))):
        # Blocks before the first wrong one are exact, so recomputing it from its predecessor's end fixes it.
        begins[:, wrong] = ends[:, wrong - 1]
        redo_picks, redo_taken = picks[wrong], taken[wrong]
        ends[:, wrong] = _run_recorded(w, starts[wrong], begins[:, wrong].copy(), length, redo_picks, redo_taken)
        picks[wrong], taken[wrong] = redo_picks, redo_taken
    return dataset_index[:num_samples], dataset_sample_index[:num_samples]


def _run_recorded(
    w: np.ndarray, first_steps: np.ndarray, counts: np.ndarray, steps: int, picks: np.ndarray, taken: np.ndarray
) -> np.ndarray:
    """`_run`, recording each block's picks and the counts they took in rows of `picks` and `taken`.

    Blocks go through in groups whose records are gathered step-major (contiguous writes) and then
    transposed into place, so memory beyond the result stays bounded.
    """
    group = max(1, _GROUP_SAMPLES // steps)
    for lo in range(0, len(first_steps), group):
        hi = min(lo + group, len(first_steps))
        step_picks = np.empty((steps, hi - lo), dtype=picks.dtype)
        step_taken = np.empty((steps, hi - lo), dtype=taken.dtype)
        counts[:, lo:hi] = _run(w, first_steps[lo:hi], counts[:, lo:hi].copy(), steps, step_picks, step_taken)
        picks[lo:hi] = step_picks.T
        taken[lo:hi] = step_taken.T
    return counts


def _predicted_counts(w: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """[k, len(steps)] counts summing to each step, as close to `w * step` as whole numbers allow."""
    ideal = w[:, None] * steps[None, :].astype(np.float64)
    counts = np.floor(ideal)
    short = steps - counts.sum(axis=0).astype(np.int64)
    rank = np.argsort(np.argsort(-(ideal - counts), axis=0, kind="stable"), axis=0)
    return counts + (rank < short[None, :])


def _run(
    w: np.ndarray,
    first_steps: np.ndarray,
    counts: np.ndarray,
    steps: int,
    picks: np.ndarray | None = None,
    taken: np.ndarray | None = None,
) -> np.ndarray:
    """Advance each block's counts ([k, blocks] float64, updated in place) by `steps` picks; return them.

    With `picks`/`taken` ([steps, blocks]), record each pick and the count it took.
    """
    num_blocks = counts.shape[1]
    flat = counts.reshape(-1)
    columns = np.arange(num_blocks)
    for t in range(steps):
        step = np.maximum(first_steps + t, 1).astype(np.float64)
        # Megatron's arithmetic exactly: weight * step - count in float64, and the first of equal errors wins.
        best_error = w[0] * step - counts[0]
        best = np.zeros(num_blocks, dtype=np.intp)
        for d in range(1, w.size):
            error = w[d] * step - counts[d]
            better = error > best_error
            best_error = np.where(better, error, best_error)
            best[better] = d
        where = best * num_blocks + columns
        if picks is not None and taken is not None:
            picks[t] = best
            taken[t] = flat[where]
        flat[where] += 1
    return counts


class BlendedDataset(Dataset):
    """Sample i is `datasets[dataset_index[i]][dataset_sample_index[i]]`."""

    def __init__(self, datasets: list[Dataset], dataset_index: np.ndarray, dataset_sample_index: np.ndarray) -> None:
        if len(dataset_index) != len(dataset_sample_index):
            raise ValueError("dataset_index and dataset_sample_index must have the same length")
        self.datasets = datasets
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[index])][int(self.dataset_sample_index[index])]


def blend_consistency(num_datasets: int) -> Callable[[dict[str, np.ndarray]], str | None]:
    """A check for cached blend indices: each dataset's samples must be numbered 0, 1, 2, ... in blend order."""

    def check(arrays: dict[str, np.ndarray]) -> str | None:
        dataset_index, sample_index = arrays["blend_dataset_idx"], arrays["blend_sample_idx"]
        seen = np.zeros(num_datasets, dtype=np.int64)
        chunk = 1 << 22
        for start in range(0, len(dataset_index), chunk):
            which = np.asarray(dataset_index[start : start + chunk])
            numbers = np.asarray(sample_index[start : start + chunk])
            for d in range(num_datasets):
                mine = numbers[which == d]
                if not np.array_equal(mine, seen[d] + np.arange(mine.size)):
                    return f"dataset {d}'s samples are not numbered in blend order near sample {start}"
                seen[d] += mine.size
        return None

    return check
