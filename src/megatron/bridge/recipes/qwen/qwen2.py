"""Qwen2.5 recipes: pretraining (the common defaults plus each size's architecture) and finetuning."""

from __future__ import annotations

from megatron.bridge.models.qwen import (
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)
from megatron.bridge.recipes.common import pretrain_common
from megatron.bridge.recipes.finetune_common import finetune_common
from megatron.bridge.training.config import ConfigContainer

__all__ = [
    "qwen25_1p5b_pretrain_config",
    "qwen25_500m_peft_config",
    "qwen25_500m_pretrain_config",
    "qwen25_500m_sft_config",
    "qwen25_7b_pretrain_config",
    "qwen25_tiny_peft_config",
    "qwen25_tiny_pretrain_config",
    "qwen25_tiny_sft_config",
]


def qwen25_500m_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen2.5-0.5B on one GPU: seq 4096, global batch 32, micro batch 2, bf16, cosine to 3e-5."""
    return pretrain_common(Qwen25ModelProvider500M(), **kwargs)


def qwen25_1p5b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen2.5-1.5B with the same training defaults as the 0.5B recipe."""
    return pretrain_common(Qwen25ModelProvider1P5B(), **{"name": "qwen25_1p5b", **kwargs})


def qwen25_7b_pretrain_config(**kwargs: str) -> ConfigContainer:
    """Qwen2.5-7B with the same training defaults (needs more memory than one GPU without sharding)."""
    return pretrain_common(Qwen25ModelProvider7B(), **{"name": "qwen25_7b", **kwargs})


def qwen25_500m_sft_config(**kwargs: str) -> ConfigContainer:
    """Full finetuning of Qwen2.5-0.5B: seq 2048 packed, global batch 128, micro batch 1, lr 5e-6, 100 steps."""
    return finetune_common(Qwen25ModelProvider500M(), **{"name": "qwen25_500m_sft", **kwargs})


def qwen25_500m_peft_config(peft_scheme: str = "lora", **kwargs: str) -> ConfigContainer:
    """LoRA (or `peft_scheme="dora"`) on Qwen2.5-0.5B: dim 32, alpha 32, lr 1e-4, otherwise as the SFT recipe."""
    return finetune_common(Qwen25ModelProvider500M(), peft_scheme=peft_scheme, **{"name": "qwen25_500m_peft", **kwargs})


def _tiny_model() -> Qwen2ModelProvider:
    # The vocabulary follows the tokenizer: a tiny base made on the spot (examples/finetune_lora.py) has its size.
    return Qwen2ModelProvider(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                              num_query_groups=2, seq_length=128, share_embeddings_and_output_weights=True,
                              vocab_size=None)


def _tiny_finetune(cfg: ConfigContainer) -> ConfigContainer:
    cfg.train.train_iters = 30
    cfg.train.global_batch_size = 8
    cfg.train.micro_batch_size = 2
    cfg.validation.eval_interval = 10
    cfg.validation.eval_iters = 2
    cfg.scheduler.lr_warmup_iters = 3
    cfg.checkpoint.save_interval = 10
    cfg.logger.log_interval = 5
    cfg.mixed_precision = "fp32"
    cfg.optimizer.bf16 = False
    return cfg


def qwen25_tiny_sft_config(**kwargs: str) -> ConfigContainer:
    """Full finetuning of a tiny Qwen2.5-shaped model (seq 256, 30 steps): about a minute on a laptop CPU."""
    cfg = _tiny_finetune(finetune_common(_tiny_model(), seq_length=256, name=kwargs.pop("name", "tiny_sft"), **kwargs))
    cfg.optimizer.lr = 3e-4
    return cfg


def qwen25_tiny_peft_config(peft_scheme: str = "lora", **kwargs: str) -> ConfigContainer:
    """LoRA (dim 8, alpha 16) on a tiny Qwen2.5-shaped model (seq 256, 30 steps): about a minute on a laptop CPU."""
    cfg = finetune_common(_tiny_model(), peft_scheme=peft_scheme, seq_length=256,
                          name=kwargs.pop("name", "tiny_peft"), **kwargs)
    cfg.peft.dim, cfg.peft.alpha = 8, 16
    cfg.optimizer.lr = 3e-3
    return _tiny_finetune(cfg)


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
