"""Qwen2.5 and Qwen3 recipes."""

from megatron.bridge.recipes.qwen.qwen2 import (
    qwen25_1p5b_pretrain_config,
    qwen25_7b_pretrain_config,
    qwen25_500m_peft_config,
    qwen25_500m_pretrain_config,
    qwen25_500m_sft_config,
    qwen25_tiny_peft_config,
    qwen25_tiny_pretrain_config,
    qwen25_tiny_sft_config,
)
from megatron.bridge.recipes.qwen.qwen3 import (
    qwen3_1p7b_pretrain_config,
    qwen3_4b_pretrain_config,
    qwen3_8b_pretrain_config,
    qwen3_14b_pretrain_config,
    qwen3_32b_pretrain_config,
    qwen3_600m_peft_config,
    qwen3_600m_pretrain_config,
    qwen3_600m_sft_config,
)

__all__ = [
    "qwen25_500m_pretrain_config",
    "qwen25_1p5b_pretrain_config",
    "qwen25_7b_pretrain_config",
    "qwen25_tiny_pretrain_config",
    "qwen3_600m_pretrain_config",
    "qwen3_1p7b_pretrain_config",
    "qwen3_4b_pretrain_config",
    "qwen3_8b_pretrain_config",
    "qwen3_14b_pretrain_config",
    "qwen3_32b_pretrain_config",
    "qwen25_500m_sft_config",
    "qwen25_500m_peft_config",
    "qwen25_tiny_sft_config",
    "qwen25_tiny_peft_config",
    "qwen3_600m_sft_config",
    "qwen3_600m_peft_config",
]
