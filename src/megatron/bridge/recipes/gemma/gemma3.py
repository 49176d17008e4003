"""Gemma 3 pretraining recipes: the common defaults with upstream's long schedule, seq 32768."""

from __future__ import annotations

from megatron.bridge.models.gemma import Gemma3ModelProvider1B
from megatron.bridge.recipes.common import long_schedule, pretrain_common
from megatron.bridge.training.config import ConfigContainer

__all__ = ["gemma3_1b_pretrain_config"]


def gemma3_1b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Gemma-3-1B (text): seq 32768, global batch 512, micro batch 1, warm-up 2000, bf16, cosine to 3e-5."""
    return long_schedule(pretrain_common(Gemma3ModelProvider1B(), **{"name": "gemma3_1b", **kwargs}))
