"""Seeded mock GPT data: packed documents that count upward, so a model can learn them fast.

Every sample is a pure function of `(seed, split, index)`: it is drawn from its own
`numpy.random.Generator`, never from global RNG state, so it is identical in any process, any
DataLoader worker and any run, and resuming needs no RNG state at all.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MAX_DOC_LENGTH", "MIN_DOC_LENGTH", "MockGPTDataset", "SPLITS"]

SPLITS = ("train", "valid", "test")
MIN_DOC_LENGTH = 16
MAX_DOC_LENGTH = 256


class MockGPTDataset(Dataset):
    """`num_samples` packed samples of `seq_length` tokens, derived from `(seed, split, index)`.

    A sample packs documents back to back, each followed by the end-of-document token
    `eod = vocab_size - 1`. A document counts upward from a random start modulo `vocab_size - 1`
    (so it never produces `eod`) and has a random length in [16, 256], capped at `seq_length`.

    Items are dicts of tensors: `tokens`, `labels` (tokens shifted left by one), `loss_mask`,
    `position_ids` and, only with `reset_attention_mask=True`, a boolean `attention_mask`
    [1, seq, seq] where True means masked out.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        seed: int,
        split: str,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: choose one of {', '.join(SPLITS)}")
        if num_samples < 0 or seq_length <= 0 or vocab_size < 2 or seed < 0:
            raise ValueError(
                f"need num_samples >= 0, seq_length > 0, vocab_size >= 2 and seed >= 0; got "
                f"{num_samples=}, {seq_length=}, {vocab_size=}, {seed=}"
            )
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.split = split
        self.eod = vocab_size - 1
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} samples")
        rng = np.random.Generator(np.random.PCG64([self.seed, SPLITS.index(self.split), index]))
        packed = _pack_documents(rng, self.seq_length + 1, self.vocab_size)
        tokens = packed[:-1]
        is_eod = tokens == self.eod
        loss_mask = np.ones(self.seq_length, dtype=np.float32)
        if self.eod_mask_loss:
            loss_mask[is_eod] = 0.0
        doc_start = _document_starts(is_eod)
        positions = np.arange(self.seq_length, dtype=np.int64)
        sample = {
            "tokens": torch.from_numpy(tokens.copy()),
            "labels": torch.from_numpy(packed[1:].copy()),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(positions - doc_start if self.reset_position_ids else positions),
        }
        if self.reset_attention_mask:
            sample["attention_mask"] = _block_causal_mask(doc_start)
        return sample


def _pack_documents(rng: np.random.Generator, length: int, vocab_size: int) -> np.ndarray:
    """`length` tokens of counting documents, each followed by an end-of-document token."""
    eod = vocab_size - 1
    low, high = min(MIN_DOC_LENGTH, length - 1), min(MAX_DOC_LENGTH, length - 1)
    # Enough documents to fill `length` even if every one has the minimum length.
    num_docs = length // (low + 1) + 1
    doc_lengths = rng.integers(low, high, size=num_docs, endpoint=True)
    first_tokens = rng.integers(0, eod, size=num_docs)
    # Each document occupies its tokens plus one end-of-document slot.
    ends = np.cumsum(doc_lengths + 1)
    pos = np.arange(length)
    doc = np.searchsorted(ends, pos, side="right")
    offset = pos - (ends[doc] - doc_lengths[doc] - 1)
    counting = (first_tokens[doc] + offset) % eod
    return np.where(offset == doc_lengths[doc], eod, counting).astype(np.int64)


def _document_starts(is_eod: np.ndarray) -> np.ndarray:
    """For each position, the position where its document starts (the token after the last eod)."""
    starts_here = np.zeros(is_eod.shape, dtype=bool)
    starts_here[0] = True
    starts_here[1:] = is_eod[:-1]
    positions = np.arange(is_eod.shape[0], dtype=np.int64)
    return np.maximum.accumulate(np.where(starts_here, positions, 0))


def _block_causal_mask(doc_start: np.ndarray) -> torch.Tensor:
    """[1, seq, seq] boolean mask, True where query t must not see key j (future or other document)."""
    start = torch.from_numpy(doc_start)
    seq = start.shape[0]
    key = torch.arange(seq)
    # Key j is visible from query t iff it lies in t's document and not after t.
    visible = (key[None, :] <= key[:, None]) & (key[None, :] >= start[:, None])
    return (~visible).unsqueeze(0)
