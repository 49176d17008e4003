"""Cross-entropy from hidden states without materialising the full logits.

For a 32k-152k vocabulary the logits of a micro-batch dwarf every other activation: 2 x 4096
tokens x 151,936 entries is 1.2 G values, 4.6 GiB in fp32. `chunked_cross_entropy` walks the
tokens in chunks: each chunk's logits are computed, reduced to per-token losses in fp32, and freed;
the backward pass recomputes them chunk by chunk. Peak logits memory is one chunk's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_cross_entropy"]


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, reduction="none")


@functools.cache
def _compiled_chunk_loss() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    # Compiled, the fp32 cast, log-softmax and target pick become one pass over the bf16 logits. Shapes
    # start static; a second shape (the last, shorter chunk; variable-length batches) compiles a dynamic one.
    return torch.compile(_chunk_loss)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_tokens: int = 4096, compiled: bool = False) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` against `labels`, in fp32.

    Args:
        hidden: `[..., hidden_size]` final hidden states.
        weight: `[vocab, hidden_size]` output-layer weight.
        labels: integer targets with `hidden`'s leading shape.
        chunk_tokens: tokens per chunk; smaller saves memory, larger launches fewer kernels.
        compiled: run each chunk through `torch.compile` (the model does when its blocks are compiled).

    Returns the losses with `labels`' shape.
    """
    chunk_loss = _compiled_chunk_loss() if compiled else _chunk_loss
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if flat_hidden.shape[0] <= chunk_tokens:
        return _unflattened(chunk_loss(flat_hidden, weight, flat_labels), labels.shape)
    losses = []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        args = (flat_hidden[start:stop], weight, flat_labels[start:stop])
        if torch.is_grad_enabled():
            # Recompute the chunk's logits in backward instead of keeping them alive.
            losses.append(checkpoint(chunk_loss, *args, use_reentrant=False))
        else:
            losses.append(chunk_loss(*args))
    return _unflattened(torch.cat(losses), labels.shape)


def _unflattened(losses: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # A copy, not a view: the model returns these losses, and FSDP2 warns when a sharded root module's
    # output is a view (an in-place op on it would skip the hook that gathers the weights for backward).
    # One float per token, next to a chunk of logits.
    return losses.reshape(shape).clone()
