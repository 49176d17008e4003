"""Finetuning batches: rows of examples, the global-batch sampler, and collation to padded micro-batches.

A row is what one line of a micro-batch holds: one example (padded batches) or several (a pack).
Global batch `k` is samples `[k * gbs, (k + 1) * gbs)` of an endless order (a seeded shuffle per epoch
for training, file order otherwise); data-parallel rank `r` reads the contiguous slice
`[r * gbs / dp, (r + 1) * gbs / dp)` of it, in micro-batches of `mbs`, as the pretraining loaders do.
Resuming therefore needs only the number of samples consumed.

Every micro-batch of a global batch has the same length: the longest row of the whole global batch,
rounded up to `pad_to_multiple_of` (capped at the most a row may hold). Every rank computes it from
the row lengths, so ranks agree without communicating and shapes do not depend on the data-parallel size.
Padding goes on the right: with causal attention no real token sees a pad, and pads carry no loss.

A micro-batch is a dict of tensors `[mbs, length]`: `tokens`, `labels` (the next tokens), `loss_mask`
(float, 1 where a label is learned), `position_ids`; packed ones add `cu_seqlens` (int32: the start of
every example, every row and every row's padding in the flattened `mbs * length` tokens, then the
total) and `max_seqlen` (0-dim int32: the longest such segment).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron.bridge.data.sft.tokenization import TokenizedExample

__all__ = ["GlobalBatchSampler", "MicroBatchPlan", "MicroBatches", "SFTRows", "collate"]


@dataclass(frozen=True)
class SFTRows:
    """Examples stored flat, grouped in rows: row `r` holds examples `row_offsets[r]:row_offsets[r + 1]`.

    Example `e` is `ids[example_offsets[e]:example_offsets[e + 1]]`, with its `loss_mask` alongside.
    """

    ids: np.ndarray
    """int32, every example's ids concatenated."""
    loss_mask: np.ndarray
    """bool, aligned with `ids` (see `TokenizedExample`)."""
    example_offsets: np.ndarray
    """int64 `[examples + 1]`, into `ids`."""
    row_offsets: np.ndarray
    """int64 `[rows + 1]`, into the examples."""
    packed: bool
    """Rows are packs: micro-batches carry `cu_seqlens` so that attention stays inside each example."""

    @classmethod
    def from_examples(cls, examples: Sequence[TokenizedExample], rows: Sequence[Sequence[int]] | None = None
                      ) -> SFTRows:
        """`examples` grouped as `rows` lists them (None: one example per row, unpacked)."""
        order = list(range(len(examples))) if rows is None else [e for row in rows for e in row]
        lengths = np.asarray([len(examples[e].ids) for e in order], dtype=np.int64)
        per_row = np.ones(len(order), dtype=np.int64) if rows is None else np.asarray([len(r) for r in rows])
        empty_ids, empty_mask = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool)
        return cls(
            ids=np.concatenate([examples[e].ids for e in order] or [empty_ids]).astype(np.int32),
            loss_mask=np.concatenate([examples[e].loss_mask for e in order] or [empty_mask]),
            example_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            row_offsets=np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64),
            packed=rows is not None,
        )

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def example_positions(self) -> np.ndarray:
        """Model positions each example fills: its ids less one."""
        return np.diff(self.example_offsets) - 1

    @property
    def row_positions(self) -> np.ndarray:
        """Model positions each row fills (the sum over its examples)."""
        cumulative = np.concatenate([[0], np.cumsum(self.example_positions)])
        return cumulative[self.row_offsets[1:]] - cumulative[self.row_offsets[:-1]]

    @property
    def num_targets(self) -> int:
        """Tokens the loss covers over all rows."""
        starts = self.example_offsets[:-1]
        return int(self.loss_mask.sum() - self.loss_mask[starts].sum())


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which rows make one micro-batch, and the length to pad them to."""

    rows: tuple[int, ...]
    length: int


class GlobalBatchSampler:
    """This rank's `MicroBatchPlan`s, one global batch after another, endlessly (see the module doc).

    `shuffle` draws a new permutation of the rows for each epoch from `(seed, epoch)`; without it the
    rows come in order, again and again. A sampler built with `consumed_samples = k * global_batch_size`
    yields exactly what a fresh one yields from global batch `k` on.
    """

    def __init__(self, row_positions: np.ndarray, *, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0, seed: int = 0,
                 shuffle: bool = True, pad_to_multiple_of: int = 1, max_length: int) -> None:
        if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"micro_batch_size ({micro_batch_size}) x dp_size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is invalid: an integer in [0, {dp_size})")
        if consumed_samples < 0 or consumed_samples % global_batch_size != 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be a multiple of {global_batch_size}")
        assert len(row_positions) > 0 and int(np.max(row_positions)) <= max_length, "rows fit max_length"
        self.row_positions = np.asarray(row_positions)
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples, self.seed, self.shuffle = consumed_samples, seed, shuffle
        self.pad_to_multiple_of, self.max_length = pad_to_multiple_of, max_length
        self._orders: dict[int, np.ndarray] = {}

    def __iter__(self) -> Iterator[MicroBatchPlan]:
        step = self.consumed_samples // self.global_batch_size
        while True:
            rows = self._global_batch(step)
            length = self._padded_length(rows)
            share = self.global_batch_size // self.dp_size
            mine = rows[self.dp_rank * share: (self.dp_rank + 1) * share]
            for start in range(0, share, self.micro_batch_size):
                yield MicroBatchPlan(tuple(int(r) for r in mine[start: start + self.micro_batch_size]), length)
            step += 1

    def _global_batch(self, step: int) -> np.ndarray:
        total = len(self.row_positions)
        samples = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        epochs, places = samples // total, samples % total
        if not self.shuffle:
            return places
        rows = np.empty_like(places)
        for epoch in np.unique(epochs):
            rows[epochs == epoch] = self._epoch_order(int(epoch))[places[epochs == epoch]]
        return rows

    def _epoch_order(self, epoch: int) -> np.ndarray:
        # One permutation per epoch, kept while its global batches are drawn (a batch may span two epochs).
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_positions))
        return self._orders[epoch]

    def _padded_length(self, rows: np.ndarray) -> int:
        longest = int(self.row_positions[rows].max())
        multiple = self.pad_to_multiple_of
        return min(-(-longest // multiple) * multiple, self.max_length)


class MicroBatches(Dataset):
    """A map-style dataset of micro-batches, addressed by `MicroBatchPlan`s (a DataLoader with `batch_size=None`)."""

    def __init__(self, rows: SFTRows, *, pad_id: int) -> None:
        self.rows = rows
        self.pad_id = pad_id

    def __getitem__(self, plan: MicroBatchPlan) -> dict[str, torch.Tensor]:
        return collate(self.rows, plan, pad_id=self.pad_id)


def collate(rows: SFTRows, plan: MicroBatchPlan, *, pad_id: int) -> dict[str, torch.Tensor]:
    """The micro-batch of `plan` (see the module doc for its tensors)."""
    batch, length = len(plan.rows), plan.length
    tokens = np.full((batch, length), pad_id, dtype=np.int64)
    labels = np.full((batch, length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((batch, length), dtype=np.float32)
    # Unpacked rows keep pretraining's positions 0..length-1 (the pads after an example are never
    # attended); in packs positions restart with each example and with the padding.
    position_ids = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    boundaries = [0]
    for line, row in enumerate(plan.rows):
        filled = 0
        for example in range(rows.row_offsets[row], rows.row_offsets[row + 1]):
            start, end = rows.example_offsets[example], rows.example_offsets[example + 1]
            span = slice(filled, filled + end - start - 1)
            tokens[line, span] = rows.ids[start: end - 1]
            labels[line, span] = rows.ids[start + 1: end]
            loss_mask[line, span] = rows.loss_mask[start + 1: end]
            if rows.packed:
                position_ids[line, span] = np.arange(end - start - 1)
            filled = span.stop
            boundaries.append(line * length + filled)
        assert filled <= length, "the sampler pads to the longest row"
        if filled < length:  # the padding is a segment of its own
            if rows.packed:
                position_ids[line, filled:] = np.arange(length - filled)
            boundaries.append((line + 1) * length)
    out = {
        "tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
    }
    if rows.packed:
        cu_seqlens = np.asarray(boundaries, dtype=np.int32)
        out["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        out["max_seqlen"] = torch.tensor(int(np.diff(cu_seqlens).max()), dtype=torch.int32)
    return out
