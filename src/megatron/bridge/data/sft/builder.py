"""Building finetuning data: each split read, checked, tokenized (and packed, or loaded from the cache), then
this rank's iterators, plus the counts the log prints.

Everything that can be wrong with the data is found here, before training starts: the whole split is
read and tokenized first, and a cache file is written only once the split is known to be good.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from megatron.bridge.data.loaders import DataIterators
from megatron.bridge.data.sft.collate import GlobalBatchSampler, MicroBatches, SFTRows
from megatron.bridge.data.sft.config import GPTSFTDatasetConfig
from megatron.bridge.data.sft.formats import SFTDataError, detect_format, parse_row, read_jsonl
from megatron.bridge.data.sft.packing import (
    CACHE_FORMAT_VERSION,
    cache_key,
    cache_path,
    file_identity,
    load_packs,
    pack_examples,
    save_packs,
)
from megatron.bridge.data.sft.tokenization import ExampleTokenizer, TokenizedExample, resolve_preprocessing

__all__ = ["PACKED_SPLITS", "SFTDataStats", "SFTSplit", "SplitStats", "build_sft_data_iterators", "build_sft_split"]

PACKED_SPLITS = ("train", "valid")
"""Splits packed when `enable_offline_packing` is set; test examples are always evaluated one per row."""


@dataclass
class SplitStats:
    """What building one split found: the counts the log prints."""

    split: str
    path: str
    examples_read: int
    """Non-blank lines read."""
    truncated: int
    """Examples cut to fit `seq_length` (or the pack size)."""
    dropped: int
    """Examples with nothing left to learn after truncation, left out."""
    rows: int
    """Rows the batches draw from: the examples kept, or the packs."""
    real_tokens: int
    """Model positions the kept examples fill."""
    loss_tokens: int
    """Tokens the loss covers."""
    pack_size: int | None = None
    """Positions per pack (None: unpacked)."""
    cache_file: str | None = None
    cache_reused: bool = False
    """The packs were loaded from `cache_file` rather than built."""

    @property
    def examples(self) -> int:
        """Examples kept."""
        return self.examples_read - self.dropped

    @property
    def packing_efficiency(self) -> float | None:
        """Real tokens over pack capacity (None: unpacked)."""
        if self.pack_size is None:
            return None
        return self.real_tokens / max(self.rows * self.pack_size, 1)

    def log_line(self) -> str:
        """One line for the run log."""
        line = (f"> finetuning data {self.split}: {self.path}: {self.examples_read} examples read, "
                f"{self.truncated} truncated, {self.dropped} dropped; {self.real_tokens} tokens, "
                f"{self.loss_tokens} in the loss")
        if self.pack_size is not None:
            source = "loaded from" if self.cache_reused else "cached in"
            line += (f"; {self.rows} packs of {self.pack_size}, packing is {100 * self.packing_efficiency:.1f}% "
                     f"efficient ({source} {self.cache_file})")
        return line


@dataclass
class SFTDataStats:
    """The stats of every split built."""

    splits: dict[str, SplitStats]

    def log_lines(self) -> list[str]:
        """One line per split, for the run log."""
        return [stats.log_line() for stats in self.splits.values()]


@dataclass
class SFTSplit:
    """One built split: its rows and what building it found."""

    rows: SFTRows
    stats: SplitStats


def build_sft_split(config: GPTSFTDatasetConfig, tokenizer: Any, split: str) -> SFTSplit:
    """Read, check and tokenize `split` (`train`, `valid` or `test`); pack it (or load its packs) when configured.

    `tokenizer` is a `HuggingFaceTokenizer` or `NullTokenizer` (anything with their SFT interface).

    Raises:
        SFTDataError: for a bad line, naming the file and line; nothing is written then.
    """
    config.validate()
    path = config.split_path(split)
    limit = config.max_train_samples if split == "train" else None
    specs = config.offline_packing_specs if config.enable_offline_packing and split in PACKED_SPLITS else None
    if specs is None:
        examples, stats = _read_examples(config, tokenizer, split, limit=limit)
        return SFTSplit(SFTRows.from_examples(examples), stats)
    inputs = {
        "version": CACHE_FORMAT_VERSION, "split": split, "data": file_identity(path),
        "tokenizer": tokenizer.fingerprint, "max_positions": config.max_positions,
        "packed_sequence_size": specs.packed_sequence_size, "packing_algorithm": specs.packing_algorithm,
        "seed": config.seed, "max_samples": limit, "preprocessing": _describe(config.preprocessing),
    }
    key = cache_key(inputs)
    folder = Path(specs.cache_dir) if specs.cache_dir is not None else Path(config.dataset_root) / "packed"
    target = cache_path(folder, path, key)
    cached = load_packs(target, key)
    if cached is not None:
        rows, stats = cached
        reused = dataclasses.replace(SplitStats(**stats), path=str(path), cache_file=str(target), cache_reused=True)
        return SFTSplit(rows, reused)
    examples, stats = _read_examples(config, tokenizer, split, limit=limit)
    lengths = [len(example.ids) - 1 for example in examples]
    packs = pack_examples(lengths, specs.packed_sequence_size, algorithm=specs.packing_algorithm, seed=config.seed)
    rows = SFTRows.from_examples(examples, packs)
    stats = dataclasses.replace(stats, rows=len(rows), pack_size=specs.packed_sequence_size, cache_file=str(target))
    save_packs(target, rows, key=key, inputs=inputs, stats=dataclasses.asdict(stats))
    return SFTSplit(rows, stats)


def _read_examples(config: GPTSFTDatasetConfig, tokenizer: Any, split: str, *, limit: int | None
                   ) -> tuple[list[TokenizedExample], SplitStats]:
    path = config.split_path(split)
    examples: list[TokenizedExample] = []
    read = truncated = 0
    fmt = example_tokenizer = None
    first_line = 0
    for where, row in read_jsonl(path):
        if fmt is None:
            fmt, first_line = detect_format(row, where), where.line
            preprocessing = resolve_preprocessing(config.preprocessing, fmt, where)
            example_tokenizer = ExampleTokenizer(preprocessing, tokenizer, max_positions=config.max_positions)
        example = example_tokenizer(parse_row(row, fmt, where, file_format_line=first_line), where)
        read += 1
        if example is not None:
            examples.append(example)
            truncated += example.truncated
        if limit is not None and len(examples) == limit:
            break
    if read == 0:
        raise SFTDataError(f"{path} holds no examples")
    if not examples:
        raise SFTDataError(f"{path}: all {read} examples were dropped: truncated to dataset.seq_length="
                           f"{config.max_positions} tokens, none keeps a token to learn")
    stats = SplitStats(
        split=split, path=str(path), examples_read=read, truncated=truncated, dropped=read - len(examples),
        rows=len(examples), real_tokens=sum(len(e.ids) - 1 for e in examples),
        loss_tokens=sum(e.num_targets for e in examples),
    )
    return examples, stats


def _describe(preprocessing: Any) -> dict[str, Any] | None:
    if preprocessing is None:
        return None
    return {"type": type(preprocessing).__name__, **dataclasses.asdict(preprocessing)}


def build_sft_data_iterators(
    config: GPTSFTDatasetConfig,
    tokenizer: Any,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> tuple[DataIterators, SFTDataStats]:
    """This rank's micro-batch iterators over the finetuning splits, and the stats of the splits built.

    A split is built when samples are requested from it (and validation / test are enabled). Training
    reshuffles its rows every epoch; validation and test cycle through theirs in order. Training and
    validation resume from their consumed sample counts. All iterators are endless.
    """
    wanted = {
        "train": train_samples > 0,
        "valid": config.do_validation and valid_samples > 0,
        "test": config.do_test and test_samples > 0,
    }
    consumed = {"train": consumed_train_samples, "valid": consumed_valid_samples, "test": 0}
    iterators: dict[str, Iterator[dict[str, torch.Tensor]] | None] = dict.fromkeys(wanted)
    stats: dict[str, SplitStats] = {}
    for split in (name for name, needed in wanted.items() if needed):
        built = build_sft_split(config, tokenizer, split)
        stats[split] = built.stats
        sampler = GlobalBatchSampler(
            built.rows.row_positions, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
            dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed[split], seed=config.seed,
            shuffle=split == "train", pad_to_multiple_of=config.pad_to_multiple_of, max_length=config.max_positions,
        )
        iterators[split] = _iterate(MicroBatches(built.rows, pad_id=tokenizer.eod), sampler, config)
    data = DataIterators(train=iterators["train"], valid=iterators["valid"], test=iterators["test"])
    return data, SFTDataStats(stats)


def _iterate(dataset: MicroBatches, sampler: GlobalBatchSampler, config: GPTSFTDatasetConfig
             ) -> Iterator[dict[str, torch.Tensor]]:
    # batch_size=None: the sampler's plans address whole micro-batches. A generator of its own keeps the
    # global torch RNG untouched, as in the pretraining loaders.
    loader = DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return iter(loader)
