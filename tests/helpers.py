"""Shared helpers for the tests: a tiny, fast configuration and a recording callback."""

from __future__ import annotations

from typing import Any

from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.gpt_step import forward_step

SEED = 1234


def shrink(cfg: ConfigContainer) -> ConfigContainer:
    """Shrink any recipe's config in place to the tiny test sizes (no checkpoints, no TensorBoard)."""
    cfg.model.num_layers = 1
    cfg.model.hidden_size = 64
    cfg.model.ffn_hidden_size = 128
    cfg.model.num_attention_heads = 4
    cfg.model.num_query_groups = 2
    cfg.model.seq_length = 32
    cfg.dataset.seq_length = 32
    cfg.model.vocab_size = None  # follow the tokenizer
    cfg.tokenizer.vocab_size = 128
    cfg.train.global_batch_size = 4
    cfg.train.micro_batch_size = 2
    cfg.logger.log_interval = 1000
    cfg.logger.tensorboard_dir = None
    cfg.checkpoint.save = None
    cfg.checkpoint.load = None
    cfg.rng.seed = SEED
    return cfg


def make_tiny_config(**overrides: Any) -> ConfigContainer:
    """`qwen25_tiny_pretrain_config()` shrunk further for speed.

    `overrides` are dotted paths with `__` for the dot, e.g. `train__train_iters=8`,
    `validation__eval_interval=None`, `checkpoint__save="/tmp/x"`, `mixed_precision="bf16_mixed"`.
    """
    cfg = shrink(qwen25_tiny_pretrain_config())
    cfg.train.train_iters = 4
    cfg.validation.eval_interval = None
    cfg.validation.eval_iters = 1
    cfg.scheduler.lr_warmup_iters = 0
    for key, value in overrides.items():
        target: Any = cfg
        *path, name = key.split("__")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise AttributeError(f"{type(target).__name__} has no field {name!r}")
        setattr(target, name, value)
    return cfg


def nan_at_step(nan_step: int):
    """The default forward step, but with NaN losses in training step `nan_step` (0-based)."""

    def step(state, data_iterator, model):
        output, loss_func = forward_step(state, data_iterator, model)
        if model.training and state.train_state.step == nan_step:
            output = output * float("nan")
        return output, loss_func

    return step
