"""Qwen2.5 recipes."""

from megatron.bridge.recipes.qwen.qwen2 import (
    qwen25_1p5b_pretrain_config,
    qwen25_7b_pretrain_config,
    qwen25_500m_pretrain_config,
    qwen25_tiny_pretrain_config,
)

__all__ = [
    "qwen25_500m_pretrain_config",
    "qwen25_1p5b_pretrain_config",
    "qwen25_7b_pretrain_config",
    "qwen25_tiny_pretrain_config",
]
