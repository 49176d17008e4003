"""Qwen2.5 pretraining recipes: the common defaults plus each size's architecture."""

from __future__ import annotations

from megatron.bridge.models.qwen import (
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)
from megatron.bridge.recipes.common import pretrain_common
from megatron.bridge.training.config import ConfigContainer


def qwen25_500m_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen2.5-0.5B on one GPU: seq 4096, global batch 32, micro batch 2, bf16, cosine to 3e-5."""
    return pretrain_common(Qwen25ModelProvider500M(), **kwargs)


def qwen25_1p5b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen2.5-1.5B with the same training defaults as the 0.5B recipe."""
    return pretrain_common(Qwen25ModelProvider1P5B(), **kwargs)


def qwen25_7b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen2.5-7B with the same training defaults (needs more memory than one GPU without sharding)."""
    return pretrain_common(Qwen25ModelProvider7B(), **kwargs)


def qwen25_tiny_pretrain_config(**kwargs: str) -> ConfigContainer:
    """A Qwen2.5-shaped model small enough to train in about a minute on a laptop CPU.

    Same architecture family (GQA, QKV bias, SwiGLU, RMSNorm, RoPE, tied embeddings), scaled down,
    on a 1,024-token vocabulary, without checkpoints; fp32 so CPU runs stay fast and exact.
    """
    model = Qwen2ModelProvider(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                               num_query_groups=2, seq_length=128, share_embeddings_and_output_weights=True)
    cfg = pretrain_common(model, name=kwargs.pop("name", "tiny"), **kwargs)
    cfg.train.train_iters = 100
    cfg.train.global_batch_size = 16
    cfg.train.micro_batch_size = 4
    cfg.train.manual_gc = False
    cfg.validation.eval_interval = 50
    cfg.validation.eval_iters = 4
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.min_lr = 3e-4
    cfg.scheduler.lr_warmup_iters = 10
    cfg.tokenizer.vocab_size = 1024
    cfg.checkpoint.save = cfg.checkpoint.load = None
    cfg.checkpoint.save_interval = None
    cfg.logger.log_interval = 10
    cfg.mixed_precision = "fp32"
    cfg.optimizer.bf16 = False
    return cfg
