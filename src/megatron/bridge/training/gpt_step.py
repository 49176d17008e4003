"""The default forward step for GPT pretraining and finetuning: fetch a batch, run the model, return a loss function.

Packed finetuning batches also carry `cu_seqlens` (and `max_seqlen`), which become the model's
`packed_seq_params`; finetuning batches hand the model their `loss_mask`, so that it computes logits
only where a loss is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from megatron.bridge.data.sft.config import GPTSFTDatasetConfig
from megatron.bridge.models.packed_seq import get_packed_seq_params
from megatron.bridge.training.state import GlobalState

__all__ = ["BATCH_KEYS", "HOST_KEYS", "forward_step", "get_batch", "masked_next_token_loss"]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
HOST_KEYS = ("max_seqlen",)
"""Batch entries left on the host: read as Python numbers, they would stall it on a device copy."""


def get_batch(data_iterator: Iterator[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """The next micro-batch, moved to `device` (asynchronously when the source is pinned memory) but `HOST_KEYS`."""
    batch = next(data_iterator)
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a batch must hold {', '.join(BATCH_KEYS)}")
    return {key: value if key in HOST_KEYS else value.to(device, non_blocking=True) for key, value in batch.items()}


def masked_next_token_loss(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of per-token losses where `loss_mask` is set, the number of such tokens, and the report.

    Returning the sum and the count (not the mean) lets the trainer normalise by the number of
    tokens in the whole global batch, so every token weighs the same whatever micro-batch it is in.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.reshape(-1).float() * mask)
    num_tokens = mask.sum()
    report = torch.stack([loss_sum.detach(), num_tokens])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(
    state: GlobalState, data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module,
    return_schedule_plan: bool = False,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Run one micro-batch through `model`; return per-token losses and the function that reduces them."""
    assert not return_schedule_plan, "schedule plans are a pipeline-parallel feature this package does not have"
    batch = get_batch(data_iterator, next(model.parameters()).device)
    # Only packed batches pass the argument, so models without it keep working on unpacked data.
    extra = {"packed_seq_params": get_packed_seq_params(batch)} if "cu_seqlens" in batch else {}
    if isinstance(getattr(getattr(state, "cfg", None), "dataset", None), GPTSFTDatasetConfig):
        # Prompts and padding are most of a finetuning batch: the model computes logits for the answers only.
        extra["loss_mask"] = batch["loss_mask"]
    output_tensor = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"], **extra
    )
    return output_tensor, partial(masked_next_token_loss, batch["loss_mask"])
