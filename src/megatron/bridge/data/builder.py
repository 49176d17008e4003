"""From a `GPTDatasetConfig` with a blend to the train, validation and test datasets.

Checks made here, all before the first training step, each raising `DatasetError` that names the
file: the `.bin`/`.idx` pair opens and agrees (see `indexed_dataset`), every token id is inside
the tokenizer's vocabulary (one vectorised scan per `.bin`, cached), and every requested split
has documents and at least one sample's worth (`seq_length + 1`) of tokens. A split smaller than
the number of samples asked for is not an error: its documents repeat over as many shuffled
epochs as needed, as in Megatron.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from megatron.bridge.data.blend import normalized_weights
from megatron.bridge.data.blended_dataset import BlendedDataset, build_blend_indices
from megatron.bridge.data.gpt_dataset import (
    SPLITS,
    GPTDataset,
    SampleOptions,
    check_split_tokens,
    split_document_ranges,
)
from megatron.bridge.data.index_cache import cached_arrays
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset
from megatron.bridge.training.distributed import print_rank_0

if TYPE_CHECKING:
    from megatron.bridge.training.config import GPTDatasetConfig


def cache_dir_for(config: GPTDatasetConfig, prefix: str) -> str:
    """Where the indices of `prefix` are cached: `dataset.path_to_cache`, else `<prefix>_cache`."""
    return config.path_to_cache or f"{prefix}_cache"


def check_token_ids(indexed: IndexedDataset, vocab_size: int, cache_dir: str) -> None:
    """DatasetError unless every token id in `indexed` lies in `[0, vocab_size)`.

    The scan reads the whole `.bin` once; its result is cached under the file's size and
    modification time, so later runs pay nothing until the file changes.
    """
    if indexed.dtype.kind not in "iu":
        raise DatasetError(f"{indexed.idx_path} declares {indexed.dtype.name} values, not integer token ids")
    stat = os.stat(indexed.bin_path)
    description = {
        "kind": "token_range", "path": os.path.abspath(indexed.prefix), "bin_bytes": stat.st_size,
        "bin_mtime_ns": stat.st_mtime_ns, "idx_bytes": os.path.getsize(indexed.idx_path),
    }
    arrays = cached_arrays(cache_dir, description, ("token_range",),
                           lambda: {"token_range": np.asarray(indexed.token_range(), dtype=np.int64)})
    low, high = (int(v) for v in arrays["token_range"])
    if indexed.num_tokens and (low < 0 or high >= vocab_size):
        bad = low if low < 0 else high
        raise DatasetError(
            f"{indexed.bin_path} holds token id {bad}, outside the tokenizer's vocabulary of {vocab_size} ids "
            f"[0, {vocab_size - 1}]: it was tokenized with another tokenizer; preprocess it again with this one "
            "(or set tokenizer.* to the one it was made with)"
        )


def build_gpt_datasets(
    config: GPTDatasetConfig, *, num_samples: tuple[int, int, int], vocab_size: int, eod: int
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Train, validation and test datasets of `num_samples` samples each; None where none are asked for.

    A split whose `dataset.split` weight is 0 also gives None (so no validation or test pass).
    """
    paths, weights = config.resolved_blend()
    indexed = [IndexedDataset(path) for path in paths]
    for dataset in indexed:
        check_token_ids(dataset, vocab_size, cache_dir_for(config, dataset.prefix))
    fractions = config.split_weights()
    options = SampleOptions(
        seq_length=config.seq_length, seed=config.random_seed, eod=eod, eod_mask_loss=config.eod_mask_loss,
        reset_position_ids=config.reset_position_ids, reset_attention_mask=config.reset_attention_mask,
    )
    built = []
    for split_no, split in enumerate(SPLITS):
        if num_samples[split_no] == 0 or fractions[split_no] == 0:
            built.append(None)
            continue
        ranges = [split_document_ranges(len(ds), fractions)[split_no] for ds in indexed]
        built.append(_build_split(config, indexed, weights, split, ranges, num_samples[split_no], options))
    return built[0], built[1], built[2]


def _build_split(
    config: GPTDatasetConfig,
    indexed: list[IndexedDataset],
    weights: list[float] | None,
    split: str,
    ranges: list[tuple[int, int]],
    num_samples: int,
    options: SampleOptions,
) -> Dataset:
    def component(i: int, count: int) -> GPTDataset:
        return GPTDataset(indexed[i], split=split, document_range=ranges[i], num_samples=count, options=options,
                          cache_dir=cache_dir_for(config, indexed[i].prefix))

    if len(indexed) == 1:
        dataset = component(0, num_samples)
        _report(split, num_samples, options.seq_length, [dataset])
        return dataset
    # Every component must be able to serve samples; its split's token count also weighs an unweighted blend.
    sizes = [check_split_tokens(ds, split, span, options.seq_length) for ds, span in zip(indexed, ranges, strict=True)]
    shares = normalized_weights(weights, sizes)
    description = {
        "kind": "blend_indices", "paths": [os.path.abspath(ds.prefix) for ds in indexed], "shares": shares,
        "split": split, "num_samples": num_samples,
    }
    arrays = cached_arrays(
        cache_dir_for(config, indexed[0].prefix), description, ("blend_dataset_idx", "blend_sample_idx"),
        lambda: dict(zip(("blend_dataset_idx", "blend_sample_idx"), build_blend_indices(shares, num_samples),
                         strict=True)),
    )
    counts = np.bincount(arrays["blend_dataset_idx"], minlength=len(indexed))
    components = [component(i, int(count)) if count > 0 else None for i, count in enumerate(counts)]
    _report(split, num_samples, options.seq_length, [c for c in components if c is not None])
    return BlendedDataset(components, arrays["blend_dataset_idx"], arrays["blend_sample_idx"])


def _report(split: str, num_samples: int, seq_length: int, datasets: list[GPTDataset]) -> None:
    sources = ", ".join(
        f"{ds.indexed.prefix} ({ds.num_samples} samples, documents [{ds.document_range[0]}, "
        f"{ds.document_range[1]}), {ds.num_samples * seq_length / ds.tokens_per_epoch:.2f} epochs)"
        for ds in datasets
    )
    print_rank_0(f"> {split} data: {num_samples} samples of {seq_length} tokens from {sources}")
