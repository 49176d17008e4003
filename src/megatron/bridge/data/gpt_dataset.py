"""Fixed-length GPT samples packed from the documents of one split of an indexed dataset.

The sample order is Megatron-LM's (`GPTDataset` of Megatron Core): the same files, split, seed,
`seq_length` and sample count give the same samples in the same order. Three index arrays decide
every sample, all drawn from one `numpy.random.RandomState(seed)`:

- epochs: the fewest whole passes over the split whose tokens cover `num_samples * seq_length + 1`;
  the index holds every sample of those epochs, `(epochs * tokens_per_epoch - 1) // seq_length`,
  at least as many as requested. With more than one epoch, the final one is kept apart when the
  samples needed from it are fewer than 80% of one epoch's samples (so that a barely started last
  pass is not spread through the others);
- document index (int32): the split's document ids repeated once per epoch and shuffled as one
  array, or with the final epoch kept apart, the earlier epochs shuffled together and then the
  final one on its own;
- sample index `[samples + 1, 2]` (int32, int64 for huge datasets): row i is `(position in the
  document index, token offset)` of token `i * seq_length` of the concatenated documents, where
  sample i starts; row 0 is `(0, 0)`. Sample i runs to the start of sample i+1 inclusive, so it holds
  `seq_length + 1` tokens and shares its last token with the next sample (inputs are its first
  `seq_length` tokens, labels its last `seq_length`);
- shuffle index (uint32, int64 for huge ones): a permutation of all the samples, drawn after the
  document index from the same generator; with the final epoch kept apart, the samples before it
  and the samples after are shuffled separately (so the samples of the first epochs come first).

The arrays depend only on the data, the split, the seed, `seq_length` and `num_samples`, and are
cached next to the data, so the sample at a given index is the same in every run, process and
DataLoader worker, and resuming after `k` consumed samples is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron.bridge.data.index_cache import ArraySpec, load_or_build
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset

__all__ = [
    "EpochPlan",
    "FINAL_EPOCH_THRESHOLD",
    "GPTDataset",
    "INDEX_NAMES",
    "INDEX_SCHEME",
    "SPLITS",
    "SampleOptions",
    "build_document_index",
    "build_indices",
    "build_sample_index",
    "build_shuffle_index",
    "check_split_tokens",
    "make_sample",
    "plan_epochs",
    "sample_index_dtype",
    "shuffle_index_dtype",
    "split_document_ranges",
    "whole_samples",
]

SPLITS = ("train", "valid", "test")
INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")
# In every cache key: indices cached by an earlier scheme (before Megatron-LM's order) are never reused.
INDEX_SCHEME = "megatron-lm-1"
FINAL_EPOCH_THRESHOLD = 0.8
_INT32_MAX = np.iinfo(np.int32).max
_BUILD_CHUNK = 1 << 22  # document-index entries handled at a time while building the sample index


@dataclass(frozen=True)
class SampleOptions:
    """How samples are cut and what each carries (the `GPTDatasetConfig` fields of the same names)."""

    seq_length: int
    seed: int
    eod: int
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False


@dataclass(frozen=True)
class EpochPlan:
    """How many passes over a split the indices make, and whether the final pass is kept apart."""

    num_epochs: int
    num_samples: int
    """Samples in the index: every whole sample of the `num_epochs` passes."""
    separate_final_epoch: bool
    samples_before_final_epoch: int
    """Samples that end before the final pass begins (shuffled on their own when it is kept apart)."""


def split_document_ranges(num_documents: int, fractions: tuple[float, float, float]) -> list[tuple[int, int]]:
    """Contiguous `[start, stop)` document ranges for train, valid and test, sized by `fractions`."""
    bounds = [0]
    cumulative = 0.0
    for fraction in fractions:
        cumulative += fraction
        bounds.append(min(int(round(cumulative * num_documents)), num_documents))
    bounds[-1] = num_documents  # rounding must not drop the last documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def whole_samples(num_tokens: int, seq_length: int) -> int:
    """Samples of `seq_length + 1` tokens (each sharing its last with the next) that `num_tokens` tokens hold."""
    return max(num_tokens - 1, 0) // seq_length


def plan_epochs(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> EpochPlan:
    """The passes that cover `num_samples` samples (one pass when None) of a split of `tokens_per_epoch` tokens."""
    assert tokens_per_epoch > 0 and seq_length > 0
    needed = 1 if num_samples is None else num_samples * seq_length + 1
    num_epochs = max(1, -(-needed // tokens_per_epoch))
    total = whole_samples(num_epochs * tokens_per_epoch, seq_length)
    if num_epochs == 1 or num_samples is None:
        return EpochPlan(num_epochs, total, False, total)
    before_final = whole_samples((num_epochs - 1) * tokens_per_epoch, seq_length)
    per_epoch = whole_samples(tokens_per_epoch, seq_length)
    separate = num_samples - before_final < int(FINAL_EPOCH_THRESHOLD * per_epoch)
    return EpochPlan(num_epochs, total, separate, before_final)


def build_document_index(documents: np.ndarray, plan: EpochPlan, rng: np.random.RandomState) -> np.ndarray:
    """The documents once per epoch, shuffled by `rng` as one array (the final epoch apart if the plan says so)."""
    index = np.tile(np.asarray(documents, dtype=np.int32), plan.num_epochs)
    if plan.separate_final_epoch:
        # Shuffling a view shuffles those entries in place: the earlier epochs, then the final one.
        rng.shuffle(index[: -len(documents)])
        rng.shuffle(index[-len(documents):])
    else:
        rng.shuffle(index)
    return index


def sample_index_dtype(document_index_size: int, max_sequence_length: int) -> np.dtype:
    """int32 while every position and offset fits, else int64."""
    return np.dtype(np.int32 if max(document_index_size, max_sequence_length) <= _INT32_MAX else np.int64)


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """`[num_samples + 1, 2]`: (document-index position, offset) of token `i * seq_length`; row 0 is (0, 0).

    The position is the document holding that token (empty documents are never chosen, except as
    the first row's). The document index is walked in bounded chunks, so memory stays small for
    any number of epochs.
    """
    dtype = sample_index_dtype(len(document_index), int(sequence_lengths.max(initial=0)))
    index = np.zeros((num_samples + 1, 2), dtype=dtype)
    next_sample, tokens_before = 1, 0
    for chunk_start in range(0, len(document_index), _BUILD_CHUNK):
        if next_sample > num_samples:
            break
        lengths = sequence_lengths[document_index[chunk_start : chunk_start + _BUILD_CHUNK]].astype(np.int64)
        ends = tokens_before + np.cumsum(lengths)
        # The samples whose first token lies in this chunk: tokens [tokens_before, ends[-1]).
        last = min(num_samples, int(ends[-1] - 1) // seq_length) if ends[-1] > tokens_before else 0
        if last >= next_sample:
            first_tokens = np.arange(next_sample, last + 1, dtype=np.int64) * seq_length
            position = np.searchsorted(ends, first_tokens, side="right")
            index[next_sample : last + 1, 0] = chunk_start + position
            index[next_sample : last + 1, 1] = first_tokens - (ends[position] - lengths[position])
            next_sample = last + 1
        tokens_before = int(ends[-1])
    if next_sample <= num_samples:
        raise ValueError(f"{tokens_before} tokens cannot fill {num_samples} samples of {seq_length} + 1 tokens")
    return index


def shuffle_index_dtype(num_samples: int) -> np.dtype:
    """uint32 below 2**32 - 2 samples, else int64."""
    return np.dtype(np.uint32 if num_samples < np.iinfo(np.uint32).max - 1 else np.int64)


def build_shuffle_index(plan: EpochPlan, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of the plan's samples; with the final epoch apart, of those before it, then of the rest."""
    index = np.arange(plan.num_samples, dtype=shuffle_index_dtype(plan.num_samples))
    split = plan.samples_before_final_epoch if plan.separate_final_epoch else plan.num_samples
    rng.shuffle(index[:split])
    if split < plan.num_samples:
        rng.shuffle(index[split:])
    return index


def build_indices(
    sequence_lengths: np.ndarray, document_range: tuple[int, int], num_samples: int | None, seq_length: int, seed: int
) -> dict[str, np.ndarray]:
    """The document, sample and shuffle index of documents `[start, stop)` for `num_samples` samples."""
    documents = np.arange(*document_range, dtype=np.int32)
    tokens_per_epoch = int(sequence_lengths[document_range[0] : document_range[1]].sum(dtype=np.int64))
    plan = plan_epochs(tokens_per_epoch, num_samples, seq_length)
    rng = np.random.RandomState(seed)  # one generator: the shuffle index continues where the documents stopped
    doc_idx = build_document_index(documents, plan, rng)
    sample_idx = build_sample_index(sequence_lengths, doc_idx, seq_length, plan.num_samples)
    shuffle_idx = build_shuffle_index(plan, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class GPTDataset(Dataset):
    """`num_samples` samples (one epoch's when None) of documents `[start, stop)` of `indexed`.

    As in Megatron-LM, the indices hold every sample of the epochs that `num_samples` needs
    (`num_indexed_samples` of them); `len()` is the number asked for, but any index below
    `num_indexed_samples` can be read, as a Megatron-LM blend may. Items are the same dicts as
    `MockGPTDataset`'s: int64 `tokens`, `labels`, `position_ids`, float32 `loss_mask` and, with
    `reset_attention_mask`, a boolean `attention_mask` [1, seq, seq] where True means masked out.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        split: str,
        document_range: tuple[int, int],
        num_samples: int | None,
        options: SampleOptions,
        cache_dir: str,
    ) -> None:
        self.indexed = indexed
        self.split = split
        self.document_range = document_range
        self.num_samples = num_samples
        self.options = options
        self.cache_dir = cache_dir
        self.tokens_per_epoch = check_split_tokens(indexed, split, document_range, options.seq_length)
        self.plan = plan_epochs(self.tokens_per_epoch, num_samples, options.seq_length)
        cached = load_or_build(
            cache_dir, self.description(), self._specs(),
            lambda: build_indices(indexed.sequence_lengths, document_range, num_samples, options.seq_length,
                                  options.seed),
        )
        self.index_source = cached.source
        self.document_index = cached.arrays["doc_idx"]
        self.sample_index = cached.arrays["sample_idx"]
        self.shuffle_index = cached.arrays["shuffle_idx"]

    def description(self) -> dict[str, object]:
        """Everything the index arrays depend on; its hash names the cache files."""
        start, stop = self.document_range
        return {
            "kind": "gpt_sample_indices", "scheme": INDEX_SCHEME, "path": os.path.abspath(self.indexed.prefix),
            "num_sequences": len(self.indexed), "lengths_sha256": self.indexed.lengths_digest,
            "split": self.split, "document_range": [start, stop],
            "seed": self.options.seed, "seq_length": self.options.seq_length, "num_samples": self.num_samples,
        }

    def _specs(self) -> dict[str, ArraySpec]:
        start, stop = self.document_range
        doc_entries = self.plan.num_epochs * (stop - start)
        longest = int(self.indexed.sequence_lengths.max())
        samples = self.plan.num_samples
        return {
            "doc_idx": ArraySpec("int32", (doc_entries,), ((start, stop - 1),)),
            "sample_idx": ArraySpec(sample_index_dtype(doc_entries, longest).name, (samples + 1, 2),
                                    ((0, doc_entries - 1), (0, max(longest - 1, 0))), increasing_rows=True),
            "shuffle_idx": ArraySpec(shuffle_index_dtype(samples).name, (samples,), ((0, samples - 1),)),
        }

    @property
    def num_indexed_samples(self) -> int:
        """Samples the indices hold: every whole sample of the planned epochs (at least `len(self)`)."""
        return self.plan.num_samples

    def __len__(self) -> int:
        return self.plan.num_samples if self.num_samples is None else self.num_samples

    def packed_tokens(self, index: int) -> np.ndarray:
        """The `seq_length + 1` token ids of sample `index` (int64)."""
        if not 0 <= index < self.num_indexed_samples:
            raise IndexError(f"index {index} is out of range for {self.num_indexed_samples} indexed samples")
        sample = int(self.shuffle_index[index])
        (first, offset), (last, last_offset) = self.sample_index[sample], self.sample_index[sample + 1]
        first, offset, last, last_offset = int(first), int(offset), int(last), int(last_offset)
        doc = self.document_index
        if first == last:
            parts = [self.indexed.get(int(doc[first]), offset, last_offset - offset + 1)]
        else:
            parts = [self.indexed.get(int(doc[first]), offset)]
            parts += [self.indexed.get(int(doc[position])) for position in range(first + 1, last)]
            parts.append(self.indexed.get(int(doc[last]), 0, last_offset + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return make_sample(self.packed_tokens(int(index)), self.options)


def make_sample(packed: np.ndarray, options: SampleOptions) -> dict[str, torch.Tensor]:
    """The training dict of one sample from its `seq_length + 1` packed tokens."""
    tokens, labels = packed[:-1], packed[1:]
    seq_length = tokens.shape[0]
    is_eod = tokens == options.eod
    loss_mask = np.ones(seq_length, dtype=np.float32)
    if options.eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = np.arange(seq_length, dtype=np.int64)
    # The position where each token's document starts: just after the last end-of-document token.
    doc_start = np.maximum.accumulate(np.where(np.concatenate([[True], is_eod[:-1]]), positions, 0))
    sample = {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(positions - doc_start if options.reset_position_ids else positions),
    }
    if options.reset_attention_mask:
        start = torch.from_numpy(doc_start)
        key = torch.arange(seq_length)
        # Query t sees key j only inside its own document and not in its future.
        visible = (key[None, :] <= key[:, None]) & (key[None, :] >= start[:, None])
        sample["attention_mask"] = (~visible).unsqueeze(0)
    return sample


def check_split_tokens(indexed: IndexedDataset, split: str, document_range: tuple[int, int], seq_length: int) -> int:
    """The tokens in documents `document_range` of `indexed`; DatasetError if none, or fewer than one sample needs."""
    start, stop = document_range
    if stop <= start:
        raise DatasetError(
            f"the {split} split of {indexed.prefix} has no documents ({len(indexed)} in the dataset, documents "
            f"[{start}, {stop}) for this split); add documents or change dataset.split"
        )
    tokens = int(indexed.sequence_lengths[start:stop].sum(dtype=np.int64))
    if tokens < seq_length + 1:
        raise DatasetError(
            f"the {split} split of {indexed.prefix} is too small: {tokens} tokens in {stop - start} documents, but "
            f"one sample needs seq_length + 1 = {seq_length + 1}; add data, lower dataset.seq_length or change "
            "dataset.split"
        )
    return tokens
