"""Gemma 3 recipes."""

from megatron.bridge.recipes.gemma.gemma3 import gemma3_1b_pretrain_config

__all__ = ["gemma3_1b_pretrain_config"]
