"""From a `GPTDatasetConfig` with a blend to the train, validation and test datasets, as Megatron-LM builds them.

Per split, with `target` samples requested (Megatron-LM's `BlendedMegatronDatasetBuilder`):

- one path without weights: a `GPTDataset` of `target` samples;
- weights (normalised to sum to one, even for a single path): dataset d serves
  `ceil(target * weight[d])` samples of the blend and is built for
  `ceil(ceil(target * weight[d]) * (1 + 0.005))` (the surplus), and the blend of their sum is
  assigned by the greedy rule of `blended_dataset`;
- several paths without weights: each dataset is built for one epoch, weighs as many samples as
  that epoch holds, and the blend has `min(target, their sum)` samples.

Checks made here, all before the first training step, each raising `DatasetError` that names the
file: the `.bin`/`.idx` pair opens and agrees (see `indexed_dataset`), every token id is inside
the tokenizer's vocabulary (one vectorised scan per `.bin`, cached), and every requested split
has documents and at least one sample's worth (`seq_length + 1`) of tokens. A split smaller than
the number of samples asked for is not an error: its documents repeat over as many shuffled
epochs as needed, as in Megatron. Under torchrun rank 0 builds (or repairs) every cached index
first; the other ranks wait for it and then load them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from megatron.bridge.data.blend import normalize
from megatron.bridge.data.blended_dataset import BlendedDataset, blend_consistency, build_blend_indices
from megatron.bridge.data.gpt_dataset import INDEX_SCHEME, SPLITS, GPTDataset, SampleOptions, split_document_ranges
from megatron.bridge.data.index_cache import ArraySpec, load_or_build, rank_zero_first
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset
from megatron.bridge.utils.errors import config_error
from megatron.bridge.utils.logging import print_rank_0

if TYPE_CHECKING:
    from megatron.bridge.data.config import GPTDatasetConfig

__all__ = [
    "Component",
    "MID_LEVEL_SURPLUS",
    "build_gpt_datasets",
    "cache_dir_for",
    "check_token_ids",
    "sizes_per_dataset",
]

# Megatron-LM's `mid_level_dataset_surplus` default: each blended dataset is built this much larger.
MID_LEVEL_SURPLUS = 0.005
# (dataset number, samples or None for one epoch) -> that dataset's GPTDataset for the split being built.
Component = Callable[[int, "int | None"], GPTDataset]


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
    info = np.iinfo(indexed.dtype)
    specs = {"token_range": ArraySpec("int64", (2,), ((min(info.min, -1), info.max),))}
    cached = load_or_build(cache_dir, description, specs,
                           lambda: {"token_range": np.asarray(indexed.token_range(), dtype=np.int64)})
    low, high = (int(v) for v in cached.arrays["token_range"])
    if indexed.num_tokens and (low < 0 or high >= vocab_size):
        bad = low if low < 0 else high
        raise DatasetError(
            f"{indexed.bin_path} holds token id {bad}, outside the tokenizer's vocabulary of {vocab_size} ids "
            f"[0, {vocab_size - 1}]: it was tokenized with another tokenizer; preprocess it again with this one "
            "(or set tokenizer.* to the one it was made with)"
        )


def sizes_per_dataset(weights: list[float], target: int, surplus: float = 0.0) -> list[int]:
    """Samples each dataset of a weighted blend serves (surplus 0) or is built for: `ceil(ceil(t * w) * (1 + s))`."""
    return [int(math.ceil(math.ceil(target * weight) * (1 + surplus))) for weight in weights]


def build_gpt_datasets(
    config: GPTDatasetConfig, *, num_samples: tuple[int, int, int], vocab_size: int, eod: int
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Train, validation and test datasets of at least `num_samples` samples each; None where none are asked for.

    A split whose `dataset.split` weight is 0 also gives None (so no validation or test pass). Must be
    called on every rank of a job (rank 0 builds the cached indices first).
    """
    if not 0 <= config.random_seed < 2**32:
        raise config_error("dataset.random_seed", config.random_seed,
                           "an integer in [0, 2**32 - 1] (it seeds numpy's RandomState, as in Megatron-LM)")
    with rank_zero_first():
        return _build_all(config, num_samples, vocab_size, eod)


def _build_all(
    config: GPTDatasetConfig, num_samples: tuple[int, int, int], vocab_size: int, eod: int
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    paths, weights = config.resolved_blend()
    indexed = [IndexedDataset(path) for path in paths]
    for dataset in indexed:
        check_token_ids(dataset, vocab_size, cache_dir_for(config, dataset.prefix))
    fractions = config.split_weights()
    options = SampleOptions(
        seq_length=config.seq_length, seed=config.random_seed, eod=eod, eod_mask_loss=config.eod_mask_loss,
        reset_position_ids=config.reset_position_ids, reset_attention_mask=config.reset_attention_mask,
    )
    shares = None if weights is None else normalize(weights)
    built: list[Dataset | None] = []
    for split_no, split in enumerate(SPLITS):
        target = num_samples[split_no]
        if target == 0 or fractions[split_no] == 0:
            if target and split != "train":
                name = _SPLIT_NAMES[split]
                print_rank_0(f"> dataset.split={config.split!r} gives the {name} split no data: no {name} passes "
                             f"run, though validation.eval_iters asks for {target} samples")
            built.append(None)
            continue
        ranges = [split_document_ranges(len(ds), fractions)[split_no] for ds in indexed]
        for dataset, document_range in zip(indexed, ranges, strict=True):
            _check_split_has_documents(config, dataset, split, document_range)

        def component(i: int, count: int | None, split: str = split, ranges: list = ranges) -> GPTDataset:
            # Bound as defaults: each split's closure keeps its own split and document ranges.
            return GPTDataset(indexed[i], split=split, document_range=ranges[i], num_samples=count,
                              options=options, cache_dir=cache_dir_for(config, indexed[i].prefix))

        if len(indexed) == 1 and shares is None:
            dataset = component(0, target)
            _report(split, target, len(dataset), options.seq_length, [dataset])
            built.append(dataset)
        elif shares is None:
            built.append(_unweighted_blend(config, indexed, split, target, component, options))
        else:
            built.append(_weighted_blend(config, indexed, shares, split, target, component, options))
    return built[0], built[1], built[2]


_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}
_EXAMPLE_SPLITS = ("98,1,1", "90,5,5", "80,10,10", "34,33,33")


def _check_split_has_documents(config: GPTDatasetConfig, dataset: IndexedDataset, split: str,
                               document_range: tuple[int, int]) -> None:
    """DatasetError, saying which `dataset.split` would work, when `split` gets none of `dataset`'s documents."""
    start, stop = document_range
    if stop > start:
        return
    count = len(dataset)
    name = _SPLIT_NAMES[split]
    fits = [example for example in _EXAMPLE_SPLITS if all(
        b > a for a, b in split_document_ranges(count, _fractions(example)))]
    if fits:
        fix = (f"set dataset.split so that each split gets documents, e.g. dataset.split={fits[0]} (this dataset has "
               f"{count} documents), or give the {name} split weight 0 to go without it")
    else:
        fix = (f"this dataset has only {count} documents, too few for three splits: add documents, or set "
               "dataset.split=100,0,0 to train on all of them without validation and test")
    raise DatasetError(f"the {name} split of {dataset.prefix} has no documents: dataset.split={config.split!r} gives "
                       f"it documents [{start}, {stop}) of the {count} in the dataset; {fix}")


def _fractions(split: str) -> tuple[float, float, float]:
    values = [float(part) for part in split.split(",")]
    return values[0] / sum(values), values[1] / sum(values), values[2] / sum(values)


def _weighted_blend(config: GPTDatasetConfig, indexed: list[IndexedDataset], shares: list[float], split: str,
                    target: int, component: Component, options: SampleOptions) -> BlendedDataset:
    components = [component(i, count) for i, count in enumerate(sizes_per_dataset(shares, target, MID_LEVEL_SURPLUS))]
    size = sum(sizes_per_dataset(shares, target))
    # Megatron normalises the weights once more inside its blended dataset; kept for identical floats.
    return _blend(config, indexed, split, components, normalize(shares), size, target, options)


def _unweighted_blend(config: GPTDatasetConfig, indexed: list[IndexedDataset], split: str, target: int,
                      component: Component, options: SampleOptions) -> BlendedDataset:
    components = [component(i, None) for i in range(len(indexed))]
    lengths = [len(c) for c in components]
    size = min(target, sum(lengths))
    if size < target and split == "train" and config.dataloader_type == "single":
        raise DatasetError(
            f"the unweighted blend of {', '.join(ds.prefix for ds in indexed)} holds {sum(lengths)} train samples "
            f"(one epoch of each dataset, as in Megatron-LM), fewer than the {target} requested: give weights "
            "(dataset.blend=[w1, path1, w2, path2, ...]) so that datasets repeat, train fewer steps, or set "
            "dataset.dataloader_type=cyclic"
        )
    return _blend(config, indexed, split, components, normalize(lengths), size, target, options)


def _blend(
    config: GPTDatasetConfig,
    indexed: list[IndexedDataset],
    split: str,
    components: list[GPTDataset],
    shares: list[float],
    size: int,
    target: int,
    options: SampleOptions,
) -> BlendedDataset:
    description = {
        "kind": "blend_indices", "scheme": INDEX_SCHEME, "paths": [os.path.abspath(ds.prefix) for ds in indexed],
        "components": [c.description() for c in components], "shares": shares, "split": split, "size": size,
    }
    longest = max(c.num_indexed_samples for c in components)
    specs = {
        "blend_dataset_idx": ArraySpec("int16", (size,), ((0, len(components) - 1),)),
        "blend_sample_idx": ArraySpec("int64", (size,), ((0, max(longest - 1, 0)),)),
    }
    cached = load_or_build(
        cache_dir_for(config, indexed[0].prefix), description, specs,
        lambda: dict(zip(specs, build_blend_indices(shares, size), strict=True)),
        check=blend_consistency(len(components)),
    )
    dataset_index, sample_index = cached.arrays["blend_dataset_idx"], cached.arrays["blend_sample_idx"]
    counts = np.bincount(dataset_index, minlength=len(components))
    for count, dataset in zip(counts, components, strict=True):
        if count > dataset.num_indexed_samples:
            raise DatasetError(
                f"the {split} blend takes {count} samples from {dataset.indexed.prefix}, which holds "
                f"{dataset.num_indexed_samples}: "
                "Megatron-LM's blend oversamples it; change the weights or the number of samples"
            )
    _report(split, target, size, options.seq_length, components, counts)
    return BlendedDataset(components, dataset_index, sample_index)


def _report(split: str, target: int, size: int, seq_length: int, datasets: list[GPTDataset],
            used: np.ndarray | None = None) -> None:
    sources = ", ".join(
        f"{ds.indexed.prefix} ({ds.num_samples if used is None else int(used[i])} samples, documents "
        f"[{ds.document_range[0]}, {ds.document_range[1]}), {ds.plan.num_epochs} epoch(s), indices {ds.index_source})"
        for i, ds in enumerate(datasets)
    )
    print_rank_0(f"> {split} data: {size} samples of {seq_length} tokens ({target} requested) from {sources}")
