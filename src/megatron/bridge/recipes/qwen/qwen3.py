"""Qwen3 pretraining recipes: the common defaults (as upstream's Qwen3 recipes keep them) plus each size."""

from __future__ import annotations

from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.qwen import (
    Qwen3ModelProvider1P7B,
    Qwen3ModelProvider4B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider14B,
    Qwen3ModelProvider32B,
    Qwen3ModelProvider600M,
)
from megatron.bridge.recipes.common import pretrain_common
from megatron.bridge.recipes.finetune_common import finetune_common
from megatron.bridge.training.config import ConfigContainer

__all__ = [
    "SEQ_LENGTH",
    "qwen3_14b_pretrain_config",
    "qwen3_1p7b_pretrain_config",
    "qwen3_32b_pretrain_config",
    "qwen3_4b_pretrain_config",
    "qwen3_600m_peft_config",
    "qwen3_600m_pretrain_config",
    "qwen3_600m_sft_config",
    "qwen3_8b_pretrain_config",
]

SEQ_LENGTH = 4096
"""Upstream's Qwen3 recipes train on 4096 tokens; the models' context (`seq_length` 40960) is far longer."""


def _qwen3(model: GPTModelProvider, **kwargs: str) -> ConfigContainer:
    model.seq_length = SEQ_LENGTH
    return pretrain_common(model, **kwargs)


def qwen3_600m_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen3-0.6B on one GPU: seq 4096, global batch 32, micro batch 2, bf16, cosine to 3e-5."""
    return _qwen3(Qwen3ModelProvider600M(), **{"name": "qwen3_600m", **kwargs})


def qwen3_1p7b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen3-1.7B with the same training defaults as the 0.6B recipe."""
    return _qwen3(Qwen3ModelProvider1P7B(), **{"name": "qwen3_1p7b", **kwargs})


def qwen3_4b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen3-4B with the same training defaults (upstream splits it over 2 GPUs with tensor parallelism)."""
    return _qwen3(Qwen3ModelProvider4B(), **{"name": "qwen3_4b", **kwargs})


def qwen3_8b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen3-8B with the same training defaults (upstream: tensor parallelism 4)."""
    return _qwen3(Qwen3ModelProvider8B(), **{"name": "qwen3_8b", **kwargs})


def qwen3_14b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen3-14B with the same training defaults (upstream: tensor parallelism 8)."""
    return _qwen3(Qwen3ModelProvider14B(), **{"name": "qwen3_14b", **kwargs})


def qwen3_32b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen3-32B with the same training defaults (upstream: tensor parallelism 8, and more)."""
    return _qwen3(Qwen3ModelProvider32B(), **{"name": "qwen3_32b", **kwargs})


def qwen3_600m_sft_config(**kwargs: str) -> ConfigContainer:
    """Full finetuning of Qwen3-0.6B: seq 2048 packed, global batch 8 (upstream's packed default), lr 5e-6."""
    cfg = finetune_common(Qwen3ModelProvider600M(), **{"name": "qwen3_600m_sft", **kwargs})
    cfg.train.global_batch_size = 8
    return cfg


def qwen3_600m_peft_config(peft_scheme: str = "lora", **kwargs: str) -> ConfigContainer:
    """LoRA (or `peft_scheme="dora"`) on Qwen3-0.6B: dim 32, alpha 32, lr 1e-4, otherwise as the SFT recipe."""
    cfg = finetune_common(Qwen3ModelProvider600M(), peft_scheme=peft_scheme, **{"name": "qwen3_600m_peft", **kwargs})
    cfg.train.global_batch_size = 8
    return cfg
