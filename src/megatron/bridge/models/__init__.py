"""Model providers (configuration that builds a model), the pure-PyTorch GPT decoder, and `AutoBridge`.

`AutoBridge` (Hugging Face checkpoints in and out) is imported on first use, so importing the providers
does not load the conversion code.
"""

from typing import Any

from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.llama import Llama31ModelProvider8B, Llama32ModelProvider1B, LlamaModelProvider
from megatron.bridge.models.packed_seq import PackedSeqParams, get_packed_seq_params
from megatron.bridge.models.qwen import (
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)

__all__ = [
    "AutoBridge",
    "GPTModel",
    "GPTModelProvider",
    "Llama31ModelProvider8B",
    "Llama32ModelProvider1B",
    "LlamaModelProvider",
    "PackedSeqParams",
    "Qwen2ModelProvider",
    "Qwen25ModelProvider500M",
    "Qwen25ModelProvider1P5B",
    "Qwen25ModelProvider7B",
    "get_packed_seq_params",
]


def __getattr__(name: str) -> Any:
    """Import `AutoBridge` lazily (PEP 562)."""
    if name == "AutoBridge":
        from megatron.bridge.models.conversion.auto_bridge import AutoBridge

        return AutoBridge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
