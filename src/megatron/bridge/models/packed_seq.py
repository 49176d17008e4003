"""Packed sequences: where the examples of a packed batch start and end, in Megatron Core's terms.

`PackedSeqParams` (Megatron Core's names) describes a batch `[batch, seq]` read as `batch * seq` tokens
in a row (`qkv_format="thd"`): `cu_seqlens_q` holds the offset where each example starts, then the
total. The decoder turns it into per-token document ids, so attention never crosses an example (nor a
row) boundary; positions should restart per example (the data's `position_ids`; by default the model
derives them so). `get_packed_seq_params(batch)` builds one from a finetuning micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedSeqParams", "get_packed_seq_params"]


@dataclass
class PackedSeqParams:
    """Example boundaries of a packed batch (self-attention: the query and key boundaries are the same).

    `cu_seqlens_q` is a 1-D integer tensor: 0, the start offset of every later example in the flattened
    `batch * seq` tokens, and finally `batch * seq`. Every row starts an example whether or not it is
    listed. `max_seqlen_*` (the longest example) are carried for Megatron Core compatibility; the
    attention kernels here do not need them.
    """

    qkv_format: str = "thd"
    """Only `thd` (tokens of all examples in a row) is supported."""
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_kv: torch.Tensor | None = None
    """Must be `cu_seqlens_q` itself or equal to it (or None: the same)."""
    max_seqlen_q: int | None = None
    max_seqlen_kv: int | None = None

    def document_ids(self, batch: int, seq: int) -> torch.Tensor:
        """Index of the example each token belongs to, `[batch, seq]` (int64, on the tensor's device)."""
        cu_seqlens = self._checked_cu_seqlens(batch * seq)
        tokens = torch.arange(batch * seq, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(batch, seq)

    def position_ids(self, batch: int, seq: int) -> torch.Tensor:
        """Positions restarting at 0 with each example and each row, `[batch, seq]` (int64)."""
        cu_seqlens = self._checked_cu_seqlens(batch * seq)
        tokens = torch.arange(batch * seq, device=cu_seqlens.device)
        starts = cu_seqlens.long()[self.document_ids(batch, seq).flatten()]
        rows = torch.arange(batch, device=cu_seqlens.device).repeat_interleave(seq) * seq
        return (tokens - torch.maximum(starts, rows)).view(batch, seq)

    def _checked_cu_seqlens(self, total: int) -> torch.Tensor:
        if self.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format={self.qkv_format!r} is invalid: only 'thd' is supported")
        cu_seqlens = self.cu_seqlens_q
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("packed_seq_params.cu_seqlens_q must be a 1-D integer tensor of example start offsets")
        kv = self.cu_seqlens_kv
        # Values are checked only on the CPU: on a GPU reading them would stall the host on every forward.
        on_host = not cu_seqlens.is_cuda
        if kv is not None and kv is not cu_seqlens and (
            kv.shape != cu_seqlens.shape or (on_host and not torch.equal(kv, cu_seqlens))
        ):
            raise ValueError("packed_seq_params.cu_seqlens_kv must equal cu_seqlens_q (self-attention)")
        if on_host:
            valid = len(cu_seqlens) >= 2 and cu_seqlens[0] == 0 and cu_seqlens[-1] == total
            if not (valid and bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all())):
                raise ValueError(
                    f"packed_seq_params.cu_seqlens_q={cu_seqlens.tolist()} is invalid: non-decreasing offsets from 0 "
                    f"to batch * seq = {total}"
                )
        return cu_seqlens


def get_packed_seq_params(batch: dict[str, torch.Tensor]) -> PackedSeqParams:
    """The `PackedSeqParams` of a packed micro-batch: its `cu_seqlens` (1-D, or `[1, n]` as upstream
    collates it) and `max_seqlen` (read as a Python int: keep it on the host to avoid a device sync)."""
    cu_seqlens = batch["cu_seqlens"]
    if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] == 1:
        cu_seqlens = cu_seqlens[0]
    max_seqlen = batch.get("max_seqlen")
    longest = None if max_seqlen is None else int(max_seqlen.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
