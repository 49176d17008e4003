"""Data-parallel sharding and batch arithmetic: the only place that knows either.

Invariant: the global batch at step k is the same set of samples whatever the number of ranks;
each rank reads only its slice. Global batch k is samples [k*gbs, (k+1)*gbs) of the dataset order,
rank r reads the contiguous slice [r*gbs/dp, (r+1)*gbs/dp) of it, in micro-batches of mbs. A run
therefore sees the same data when it is resumed on a different number of ranks, and resuming only
needs the number of samples consumed so far: the stream goes on at that sample, so a run may also
resume with another global batch size (as Megatron's sampler does).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from megatron.bridge.data.builder import build_gpt_datasets
from megatron.bridge.data.config import DATALOADER_TYPES, GPTDatasetConfig
from megatron.bridge.data.mock import MockGPTDataset

__all__ = ["DataIterators", "MicroBatch", "MicroBatchSampler", "build_data_iterators"]

MicroBatch = dict[str, torch.Tensor]


class MicroBatchSampler:
    """Batch sampler yielding one data-parallel rank's micro-batches (lists of sample indices).

    Its first global batch starts at sample `consumed_samples`, so a sampler built with
    `consumed_samples = k * global_batch_size` yields exactly what a fresh one yields from step k on,
    and one built after samples were consumed with another batch size goes on right after them.
    `single` stops after the last full global batch of the dataset; `cyclic` never stops and reads
    sample `global_index % total_samples`.
    """

    def __init__(
        self,
        *,
        total_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        consumed_samples: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        dataloader_type: str = "single",
    ) -> None:
        if dataloader_type not in DATALOADER_TYPES:
            allowed = ", ".join(DATALOADER_TYPES)
            raise ValueError(f"dataloader_type={dataloader_type!r} is invalid: choose one of {allowed}")
        if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"micro_batch_size ({micro_batch_size}) x dp_size ({dp_size})"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is invalid: an integer in [0, {dp_size})")
        if isinstance(consumed_samples, bool) or not isinstance(consumed_samples, int) or consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples!r} is invalid: an integer >= 0")
        if dataloader_type == "cyclic" and total_samples <= 0:
            raise ValueError("a cyclic sampler needs a non-empty dataset")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.consumed_samples = consumed_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.dataloader_type = dataloader_type

    @property
    def samples_per_rank(self) -> int:
        """How many samples of each global batch this rank reads."""
        return self.global_batch_size // self.dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while self.dataloader_type == "cyclic" or start + self.global_batch_size <= self.total_samples:
            yield from self._rank_micro_batches(start)
            start += self.global_batch_size

    def __len__(self) -> int:
        """Micro-batches left for this rank (`single` only: a cyclic sampler is endless)."""
        if self.dataloader_type == "cyclic":
            raise TypeError("a cyclic MicroBatchSampler is endless and has no length")
        steps_left = max(self.total_samples - self.consumed_samples, 0) // self.global_batch_size
        return steps_left * (self.samples_per_rank // self.micro_batch_size)

    def _rank_micro_batches(self, batch_start: int) -> Iterator[list[int]]:
        first = batch_start + self.dp_rank * self.samples_per_rank
        for start in range(first, first + self.samples_per_rank, self.micro_batch_size):
            yield [index % self.total_samples for index in range(start, start + self.micro_batch_size)]


@dataclass
class DataIterators:
    """Micro-batch iterators for each split; None for a split with no samples requested."""

    train: Iterator[MicroBatch] | None
    valid: Iterator[MicroBatch] | None
    test: Iterator[MicroBatch] | None


def build_data_iterators(
    dataset_config: GPTDatasetConfig,
    *,
    vocab_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
    eod: int | None = None,
) -> DataIterators:
    """This rank's iterators over batched micro-batches (dicts of [mbs, seq] tensors).

    Mock data when `dataset_config.uses_mock_data`, else the indexed datasets of its blend, with
    `eod` (default `vocab_size - 1`) as the end-of-document id and every token id checked against
    `vocab_size`. Train follows `dataset_config.dataloader_type`; valid and test are cyclic, so
    evaluation can draw any number of batches. Train and valid resume from their consumed sample counts.
    """
    num_samples = (train_samples, valid_samples, test_samples)
    if dataset_config.uses_mock_data:
        train_ds, valid_ds, test_ds = _build_mock_datasets(dataset_config, vocab_size, num_samples)
    else:
        train_ds, valid_ds, test_ds = build_gpt_datasets(
            dataset_config, num_samples=num_samples, vocab_size=vocab_size,
            eod=vocab_size - 1 if eod is None else eod,
        )
    common: dict[str, Any] = dict(
        config=dataset_config, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
        dp_rank=dp_rank, dp_size=dp_size,
    )
    return DataIterators(
        train=_build_iterator(
            train_ds, consumed_samples=consumed_train_samples, dataloader_type=dataset_config.dataloader_type,
            **common,
        ),
        valid=_build_iterator(
            valid_ds, consumed_samples=consumed_valid_samples, dataloader_type="cyclic", **common
        ),
        test=_build_iterator(test_ds, consumed_samples=0, dataloader_type="cyclic", **common),
    )


def _build_mock_datasets(
    config: GPTDatasetConfig, vocab_size: int, num_samples: tuple[int, int, int]
) -> tuple[MockGPTDataset, MockGPTDataset, MockGPTDataset]:
    # Mock data is endless in principle; sizing each split to its request keeps `single` exact.
    train_ds, valid_ds, test_ds = (
        MockGPTDataset(
            num_samples=count, seq_length=config.seq_length, vocab_size=vocab_size, seed=config.random_seed,
            split=split, eod_mask_loss=config.eod_mask_loss, reset_position_ids=config.reset_position_ids,
            reset_attention_mask=config.reset_attention_mask,
        )
        for split, count in zip(("train", "valid", "test"), num_samples, strict=True)
    )
    return train_ds, valid_ds, test_ds


def _build_iterator(
    dataset: Dataset | None,
    *,
    config: GPTDatasetConfig,
    micro_batch_size: int,
    global_batch_size: int,
    consumed_samples: int,
    dataloader_type: str,
    dp_rank: int,
    dp_size: int,
) -> Iterator[MicroBatch] | None:
    if dataset is None or len(dataset) == 0:
        return None
    sampler = MicroBatchSampler(
        total_samples=len(dataset), micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
        consumed_samples=consumed_samples, dp_rank=dp_rank, dp_size=dp_size, dataloader_type=dataloader_type,
    )
    # A generator of its own: otherwise creating the iterator draws from the global torch RNG, and a
    # resumed run's dropout masks would no longer match an uninterrupted run's.
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=config.num_workers > 0, generator=torch.Generator().manual_seed(config.random_seed),
    )
    return iter(loader)
