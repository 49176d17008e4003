"""Tiny models for the PEFT tests: built from a provider, trained for real with the project's optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron.bridge.models import GPTModel, GPTModelProvider
from megatron.bridge.training.config import OptimizerConfig, SchedulerConfig
from megatron.bridge.training.optim import setup_optimizer

VOCAB, SEQ = 128, 16


def tiny_provider(**overrides) -> GPTModelProvider:
    """Qwen2-shaped: grouped queries, q/k/v biases, SwiGLU, tied embeddings; two layers of width 64."""
    fields = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  vocab_size=VOCAB, seq_length=SEQ, add_qkv_bias=True)
    fields.update(overrides)
    return GPTModelProvider(**fields)


def tiny_model(peft: Callable[[GPTModel], GPTModel] | None = None, *, seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    model = tiny_provider(**overrides).provide()
    return model if peft is None else peft(model)


def token_batch(batch: int = 4, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """`[batch, SEQ + 1]` random tokens: inputs are `[:, :-1]`, labels `[:, 1:]`."""
    return torch.randint(0, vocab, (batch, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def train_steps(model: torch.nn.Module, steps: int, *, lr: float = 1e-2) -> torch.optim.Optimizer:
    """`steps` AdamW steps of the project's optimizer (built over `requires_grad` parameters) on fixed batches."""
    optimizer, scheduler = setup_optimizer(
        OptimizerConfig(lr=lr, min_lr=lr, weight_decay=0.0), SchedulerConfig(lr_decay_style="constant"),
        [model], train_iters=steps,
    )
    model.train()
    for step in range(steps):
        tokens = token_batch(seed=step)
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return optimizer
