"""Fixed-length GPT samples packed from the documents of one split of an indexed dataset.

Three index arrays decide every sample, following Megatron's scheme:

- document index: the split's document ids in a fresh random order for each epoch, epochs
  concatenated, with as many epochs as `num_samples` needs;
- sample index `[num_samples + 1, 2]`: row i is `(position in the document index, token offset)`
  where sample i starts; sample i runs to the start of sample i+1 inclusive, so it holds
  `seq_length + 1` tokens and shares its last token with the next sample (inputs are its first
  `seq_length` tokens, labels its last `seq_length`);
- shuffle index: a permutation of the samples.

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

from megatron.bridge.data.index_cache import cached_arrays
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset

SPLITS = ("train", "valid", "test")
INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


@dataclass(frozen=True)
class SampleOptions:
    """How samples are cut and what each carries (the `GPTDatasetConfig` fields of the same names)."""

    seq_length: int
    seed: int
    eod: int
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False


def split_document_ranges(num_documents: int, fractions: tuple[float, float, float]) -> list[tuple[int, int]]:
    """Contiguous `[start, stop)` document ranges for train, valid and test, sized by `fractions`."""
    bounds = [0]
    cumulative = 0.0
    for fraction in fractions:
        cumulative += fraction
        bounds.append(min(int(round(cumulative * num_documents)), num_documents))
    bounds[-1] = num_documents  # rounding must not drop the last documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Epochs whose tokens cover `num_samples` samples (each needs `seq_length` tokens, plus one at the end)."""
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """The documents in a fresh random order per epoch, epochs concatenated."""
    dtype = np.int32 if documents.size == 0 or documents.max() < np.iinfo(np.int32).max else np.int64
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(dtype)


def build_sample_index(document_lengths: np.ndarray, num_samples: int, seq_length: int) -> np.ndarray:
    """`[num_samples + 1, 2]` (document-index position, offset) of each sample's first token.

    Sample i starts at token `i * seq_length` of the concatenated documents; the position is the
    document holding that token (empty documents are skipped), the offset the token within it.
    """
    ends = np.cumsum(document_lengths, dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples > 0 and ends[-1] < starts[-1] + 1:
        raise ValueError(f"{ends[-1]} tokens cannot fill {num_samples} samples of {seq_length} + 1 tokens")
    position = np.searchsorted(ends, starts, side="right")
    first_token = ends[position] - document_lengths[position]
    return np.stack([position, starts - first_token], axis=1)


def build_shuffle_index(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of the sample ids."""
    dtype = np.int32 if num_samples < np.iinfo(np.int32).max else np.int64
    return rng.permutation(num_samples).astype(dtype)


class GPTDataset(Dataset):
    """`num_samples` samples of `seq_length` tokens from documents `[start, stop)` of `indexed`.

    Items are the same dicts as `MockGPTDataset`'s: int64 `tokens`, `labels`, `position_ids`,
    float32 `loss_mask` and, with `reset_attention_mask`, a boolean `attention_mask` [1, seq, seq]
    where True means masked out.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        split: str,
        document_range: tuple[int, int],
        num_samples: int,
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
        arrays = cached_arrays(cache_dir, self.description(), INDEX_NAMES, self._build_indices)
        self.document_index = arrays["doc_idx"]
        self.sample_index = arrays["sample_idx"]
        self.shuffle_index = arrays["shuffle_idx"]

    def description(self) -> dict[str, object]:
        """Everything the index arrays depend on; its hash names the cache files."""
        start, stop = self.document_range
        return {
            "kind": "gpt_sample_indices", "path": os.path.abspath(self.indexed.prefix),
            "num_sequences": len(self.indexed), "lengths_sha256": self.indexed.lengths_digest,
            "split": self.split, "document_range": [start, stop],
            "seed": self.options.seed, "seq_length": self.options.seq_length, "num_samples": self.num_samples,
        }

    def _build_indices(self) -> dict[str, np.ndarray]:
        options = self.options
        # One stream per split and array, so changing one never reshuffles another.
        split_code = SPLITS.index(self.split)
        documents = np.arange(*self.document_range, dtype=np.int64)
        num_epochs = num_epochs_needed(self.tokens_per_epoch, self.num_samples, options.seq_length)
        doc_idx = build_document_index(documents, num_epochs, np.random.default_rng([options.seed, split_code, 0]))
        lengths = self.indexed.sequence_lengths[doc_idx].astype(np.int64)
        sample_idx = build_sample_index(lengths, self.num_samples, options.seq_length)
        shuffle_idx = build_shuffle_index(self.num_samples, np.random.default_rng([options.seed, split_code, 1]))
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def __len__(self) -> int:
        return self.num_samples

    def packed_tokens(self, index: int) -> np.ndarray:
        """The `seq_length + 1` token ids of sample `index` (int64)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} samples")
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
