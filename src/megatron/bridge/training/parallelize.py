"""Compilation and data parallelism: the one place that wraps the model after it is built.

- `torch.compile` of each transformer block when `train.compile` (by default on GPUs).
- `DistributedDataParallel` by default: parameters and optimizer state replicated, gradients
  all-reduced once per step, during the last micro-batch's backward pass (`ddp.overlap_grad_reduce`,
  on by default: DDP's buckets reduce as their gradients are ready), or after it
  (`overlap_grad_reduce=False`, as Megatron's default: `reduce_gradients` in a few flat buckets).
- FSDP2 (`fully_shard` per transformer block, then the whole model) when
  `ddp.use_distributed_optimizer` or `optimizer.use_distributed_optimizer` is set: parameters,
  gradients and optimizer state sharded across ranks.

In a world of one the model is not wrapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.utils.parallel import ParallelLayout

__all__ = ["parallelize", "reduce_gradients", "set_grad_sync", "should_compile", "uses_fsdp"]


def uses_fsdp(cfg: ConfigContainer) -> bool:
    """True when the config asks for sharded parameters and optimizer state."""
    return cfg.uses_distributed_optimizer


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
    # No buffer option: the decoder has no buffers (RoPE frequencies are recomputed per call), so DDP's
    # buffer broadcast has nothing to send; torch 2.13 deprecates `broadcast_buffers` and warns on any value.
    wrapped = DistributedDataParallel(model, device_ids=device_ids, process_group=layout.data_parallel_group)
    reduce_in_bf16 = cfg.compute_dtype == "bf16" and not cfg.ddp.grad_reduce_in_fp32 and layout.device.type == "cuda"
    if not cfg.ddp.overlap_grad_reduce:
        wrapped.reduce_after_backward = torch.bfloat16 if reduce_in_bf16 else torch.float32
    elif reduce_in_bf16:
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
        model.require_backward_grad_sync = enabled and getattr(model, "reduce_after_backward", None) is None
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per reduction: few collectives, bounded extra memory


def reduce_gradients(model: torch.nn.Module, layout: ParallelLayout) -> None:
    """Average the gradients over the data-parallel replicas now (only with `ddp.overlap_grad_reduce=False`).

    The backward passes left them unreduced; they go in flat buckets of one dtype, each one collective, in
    the dtype `parallelize` chose (bf16 when DDP's hook would have compressed). Every rank must call it.
    """
    reduce_dtype = getattr(model, "reduce_after_backward", None)
    if reduce_dtype is None:
        return
    bucket: list[torch.Tensor] = []
    elements = 0
    for grad in (p.grad for p in model.parameters() if p.grad is not None):
        bucket.append(grad)
        elements += grad.numel()
        if elements >= _BUCKET_ELEMENTS:
            _average(bucket, reduce_dtype, layout)
            bucket, elements = [], 0
    if bucket:
        _average(bucket, reduce_dtype, layout)


def _average(grads: list[torch.Tensor], dtype: torch.dtype, layout: ParallelLayout) -> None:
    flat = _flatten_dense_tensors(grads).to(dtype)
    dist.all_reduce(flat, group=layout.data_parallel_group)
    flat = flat.to(grads[0].dtype).div_(layout.data_parallel_size)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)
