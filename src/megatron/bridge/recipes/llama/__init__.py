"""Llama 3, 3.1 and 3.2 recipes."""

from megatron.bridge.recipes.llama.llama3 import (
    llama3_8b_pretrain_config,
    llama31_8b_pretrain_config,
    llama32_1b_peft_config,
    llama32_1b_pretrain_config,
    llama32_1b_sft_config,
    llama32_3b_pretrain_config,
)

__all__ = [
    "llama32_1b_pretrain_config",
    "llama32_3b_pretrain_config",
    "llama3_8b_pretrain_config",
    "llama31_8b_pretrain_config",
    "llama32_1b_sft_config",
    "llama32_1b_peft_config",
]
