"""Model providers (configuration that builds a model) and the pure-PyTorch GPT decoder."""

from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.qwen import (
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)

__all__ = [
    "GPTModel",
    "GPTModelProvider",
    "Qwen2ModelProvider",
    "Qwen25ModelProvider500M",
    "Qwen25ModelProvider1P5B",
    "Qwen25ModelProvider7B",
]
