"""How much memory a rank will need, and how much it has: the start-up estimate and the log line's reading.

The estimate counts, per rank:

- weights: every parameter's bytes (fp32 master weights under mixed precision);
- gradients: the trainable parameters' bytes (a LoRA run: its adapters only), twice under DDP, whose
  reduction buckets hold a second copy;
- optimizer state: per trainable parameter two fp32-sized tensors for Adam, one for SGD with momentum;
- activations of one micro-batch (`t = micro_batch_size * seq_length` tokens), a rough count of the
  tensors each layer keeps for the backward pass:

      t * (4h * r  +  c * (2h + (3a + 4g) * d + 4f))   bytes per layer

  with h the hidden size, a the attention heads, g the query groups, d the head size, f the MLP
  width, c the bytes of the compute dtype (2 for bf16/fp16, 4 for fp32) and r those of the residual
  stream (the parameters' dtype): the two norms' fp32 inputs and outputs and their casts, q/k/v
  before and after the rotary embedding, the attention output (a fused kernel keeps no seq x seq
  scores), and the MLP's gate, up, activation and product. With `recompute_granularity="full"` a
  layer keeps only its input (`t * h * r`) and one layer's tensors are alive at a time. Add the
  embedding output and the final norm (`t * h * (3r + c)`), and the loss's logits, computed in chunks
  of at most 4096 tokens (`min(t, 4096) * vocab * (c + 8)`: the logits, their fp32 copy and gradient).

FSDP2 shards weights, gradients and optimizer state over the data-parallel ranks. The estimate
leaves out the allocator's fragmentation, compiled kernels' workspaces and the framework itself
(a few hundred MB of host memory); expect the real peak within a factor of about 1.5.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass

import torch

__all__ = [
    "LOSS_CHUNK_TOKENS",
    "MemoryEstimate",
    "activation_bytes",
    "device_memory_bytes",
    "estimate_memory",
    "resident_bytes",
]

LOSS_CHUNK_TOKENS = 4096
"""Tokens per chunk of the chunked cross-entropy (`models.losses.chunked_cross_entropy`'s default)."""
_CGROUP_LIMIT = "/sys/fs/cgroup/memory.max"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs for training, by kind (see the module docstring for what each counts)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """All of it."""
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_memory(model: torch.nn.Module, cfg, *, data_parallel_size: int) -> MemoryEstimate:
    """The memory one rank of this run needs, from the built (unwrapped) `model` and the config `cfg`."""
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    states = _optimizer_tensors_per_param(cfg.optimizer)
    optimizer = states * sum(p.numel() * p.element_size() for p in trainable)
    if cfg.uses_distributed_optimizer:
        weights, gradients, optimizer = (-(-n // data_parallel_size) for n in (weights, gradients, optimizer))
    elif data_parallel_size > 1:
        gradients *= 2  # DDP's buckets: a flat copy of every gradient for the all-reduce
    residual_bytes = params[0].element_size() if params else 4
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=activation_bytes(cfg, residual_bytes=residual_bytes))


def activation_bytes(cfg, *, residual_bytes: int = 4) -> int:
    """The rough activation memory of one micro-batch (the module docstring's formula)."""
    model = cfg.model
    tokens = cfg.train.micro_batch_size * model.seq_length
    h, f, d = model.hidden_size, model.resolved_ffn_hidden_size, model.resolved_kv_channels
    a, g = model.num_attention_heads, model.resolved_num_query_groups
    c, r = (4 if cfg.compute_dtype == "fp32" else 2), residual_bytes
    per_layer = tokens * (4 * h * r + c * (2 * h + (3 * a + 4 * g) * d + 4 * f))
    if model.recompute_granularity == "full":
        layers = model.num_layers * tokens * h * r + per_layer
    else:
        layers = model.num_layers * per_layer
    ends = tokens * h * (3 * r + c)
    logits = min(tokens, LOSS_CHUNK_TOKENS) * model.padded_vocab_size * (c + 8)
    return layers + ends + logits


def _optimizer_tensors_per_param(optimizer_cfg) -> int:
    if optimizer_cfg.optimizer == "sgd":
        return 1 if optimizer_cfg.sgd_momentum else 0
    return 2  # Adam: first and second moments


def device_memory_bytes(device: torch.device) -> int | None:
    """What `device` has: a GPU's total memory, or the machine's RAM (within a cgroup's limit); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    with contextlib.suppress(OSError, ValueError):
        with open(_CGROUP_LIMIT, encoding="ascii") as f:
            limit = f.read(64).strip()
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def resident_bytes() -> int:
    """This process's resident set (RSS) now; its peak where the current size cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read(256).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
