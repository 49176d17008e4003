"""Llama 3 / 3.1 / 3.2 pretraining recipes: the common defaults with upstream's Llama schedule, seq 8192."""

from __future__ import annotations

from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.llama import (
    Llama3ModelProvider8B,
    Llama31ModelProvider8B,
    Llama32ModelProvider1B,
    Llama32ModelProvider3B,
)
from megatron.bridge.recipes.common import long_schedule, pretrain_common
from megatron.bridge.recipes.finetune_common import finetune_common
from megatron.bridge.training.config import ConfigContainer

__all__ = [
    "SEQ_LENGTH",
    "llama31_8b_pretrain_config",
    "llama32_1b_peft_config",
    "llama32_1b_pretrain_config",
    "llama32_1b_sft_config",
    "llama32_3b_pretrain_config",
    "llama3_8b_pretrain_config",
]

SEQ_LENGTH = 8192
"""Llama 3's pretraining context, for the model and the dataset alike."""


def _llama3(model: GPTModelProvider, **kwargs: str) -> ConfigContainer:
    model.seq_length = SEQ_LENGTH
    return long_schedule(pretrain_common(model, **kwargs))


def llama32_1b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Llama-3.2-1B: seq 8192, global batch 512, micro batch 1, warm-up 2000, bf16, cosine to 3e-5."""
    return _llama3(Llama32ModelProvider1B(), **{"name": "llama32_1b", **kwargs})


def llama32_3b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Llama-3.2-3B with the same training defaults as the 1B recipe."""
    return _llama3(Llama32ModelProvider3B(), **{"name": "llama32_3b", **kwargs})


def llama3_8b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Meta-Llama-3-8B with the same training defaults (upstream adds context parallelism 2)."""
    return _llama3(Llama3ModelProvider8B(), **{"name": "llama3_8b", **kwargs})


def llama31_8b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Llama-3.1-8B with the same training defaults (upstream adds context parallelism 2)."""
    return _llama3(Llama31ModelProvider8B(), **{"name": "llama31_8b", **kwargs})


def llama32_1b_sft_config(**kwargs: str) -> ConfigContainer:
    """Full finetuning of Llama-3.2-1B: seq 4096 packed, global batch 8, micro batch 1, lr 5e-6."""
    cfg = finetune_common(Llama32ModelProvider1B(), seq_length=4096, **{"name": "llama32_1b_sft", **kwargs})
    cfg.train.global_batch_size = 8
    return cfg


def llama32_1b_peft_config(peft_scheme: str = "lora", **kwargs: str) -> ConfigContainer:
    """LoRA (or `peft_scheme="dora"`) on Llama-3.2-1B: dim 32, alpha 32, lr 1e-4, otherwise as the SFT recipe."""
    cfg = finetune_common(Llama32ModelProvider1B(), peft_scheme=peft_scheme, seq_length=4096,
                          **{"name": "llama32_1b_peft", **kwargs})
    cfg.train.global_batch_size = 8
    return cfg
