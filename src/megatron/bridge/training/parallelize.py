"""Compilation and data parallelism: the one place that wraps the model after it is built.

- `torch.compile` of each transformer block when `train.compile` (by default on GPUs).
- `DistributedDataParallel` by default: parameters and optimizer state replicated, gradients
  all-reduced once per step (after the last micro-batch).
- FSDP2 (`fully_shard` per transformer block, then the whole model) when
  `ddp.use_distributed_optimizer` or `optimizer.use_distributed_optimizer` is set: parameters,
  gradients and optimizer state sharded across ranks.

In a world of one the model is not wrapped.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.utils.parallel import ParallelLayout


def uses_fsdp(cfg: ConfigContainer) -> bool:
    """True when the config asks for sharded parameters and optimizer state."""
    return cfg.ddp.use_distributed_optimizer or cfg.optimizer.use_distributed_optimizer


def parallelize(model: torch.nn.Module, cfg: ConfigContainer, layout: ParallelLayout) -> torch.nn.Module:
    """Compile each block when asked, then wrap `model` for data-parallel training."""
    if should_compile(cfg, layout.device):
        # Per block rather than the whole model: one small graph, reused by every layer; and the loss,
        # whose eager fp32 logits cost a step as much memory traffic as a few blocks.
        for block in model.layers:
            block.compile()
        model.compile_loss = True
    if layout.data_parallel_size == 1:
        return model
    if uses_fsdp(cfg):
        return _apply_fsdp(model, cfg, layout)
    device_ids = [layout.device.index] if layout.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                      process_group=layout.data_parallel_group)
    if cfg.compute_dtype == "bf16" and not cfg.ddp.grad_reduce_in_fp32 and layout.device.type == "cuda":
        # Megatron reduces gradients in the compute dtype unless told otherwise: half the traffic.
        # (The hook needs NCCL; gloo on the CPU reduces the fp32 gradients as they are.)
        wrapped.register_comm_hook(state=None, hook=bf16_compress_hook)
    return wrapped


def should_compile(cfg: ConfigContainer, device: torch.device) -> bool:
    """Whether transformer blocks are compiled: `train.compile`, or by default only on GPUs."""
    return cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"


def _apply_fsdp(model: torch.nn.Module, cfg: ConfigContainer, layout: ParallelLayout) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reduce_dtype = torch.bfloat16 if cfg.compute_dtype == "bf16" and not cfg.ddp.grad_reduce_in_fp32 else None
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mesh=layout.data_parallel_mesh, mp_policy=policy)
    fully_shard(model, mesh=layout.data_parallel_mesh, mp_policy=policy)
    return model


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the gradient reduction of the next backward pass on or off.

    Off for all but the last micro-batch of a step, so gradients are reduced once per step.
    """
    if isinstance(model, DistributedDataParallel):
        # Toggling the flag rather than entering `no_sync()` keeps the micro-batch loop flat.
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
