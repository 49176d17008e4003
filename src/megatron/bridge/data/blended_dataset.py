"""Weighted blends of several datasets, sample by sample.

Megatron's greedy rule decides which dataset serves each sample: sample i goes to the dataset
whose count so far lags its share the most, i.e. the d maximising `weight[d] * (i + 1) - count[d]`
(ties to the lower index). Every prefix of the blend therefore holds each dataset within one
sample of its exact share, and dataset d's k-th sample is always its sample k, so each component
is read in its own (shuffled) order and only as far as the blend needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def build_blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """For each blended sample: which dataset serves it, and which of that dataset's samples."""
    if not weights or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"blend weights {weights} must be non-negative with a positive sum")
    total = sum(weights)
    shares = [w / total for w in weights]
    counts = [0] * len(shares)
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    # A plain Python loop over a handful of datasets: the result is cached, and exactness matters
    # more than speed here (about a second per million samples).
    candidates = range(len(shares))
    for i in range(num_samples):
        target = i + 1
        chosen = max(candidates, key=lambda d: (shares[d] * target - counts[d], -d))
        dataset_index[i] = chosen
        dataset_sample_index[i] = counts[chosen]
        counts[chosen] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset(Dataset):
    """Sample i is `datasets[dataset_index[i]][dataset_sample_index[i]]`."""

    def __init__(self, datasets: list[Dataset | None], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray) -> None:
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
        dataset = self.datasets[int(self.dataset_index[index])]
        assert dataset is not None, "the blend index names a dataset that serves no samples"
        return dataset[int(self.dataset_sample_index[index])]
