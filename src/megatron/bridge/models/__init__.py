"""Model providers (configuration that builds a model), the pure-PyTorch GPT decoder, and `AutoBridge`.

One package per model family (`qwen`, `llama`, `mistral`, `gemma`) holds its providers and, in its
`*_bridge` modules, its Hugging Face mapping; `registry.FAMILIES` lists the families. `AutoBridge`
(Hugging Face checkpoints in and out) and the registry are imported on first use, so importing the
providers does not load the conversion code.
"""

from typing import Any

from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.models.gemma import Gemma3ModelProvider, Gemma3ModelProvider1B
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.llama import (
    Llama3ModelProvider8B,
    Llama31ModelProvider8B,
    Llama32ModelProvider1B,
    Llama32ModelProvider3B,
    LlamaModelProvider,
)
from megatron.bridge.models.mistral import MistralModelProvider, MistralModelProvider7B
from megatron.bridge.models.packed_seq import PackedSeqParams, get_packed_seq_params
from megatron.bridge.models.qwen import (
    Qwen2ModelProvider,
    Qwen3ModelProvider,
    Qwen3ModelProvider1P7B,
    Qwen3ModelProvider4B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider14B,
    Qwen3ModelProvider32B,
    Qwen3ModelProvider600M,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)

__all__ = [
    "AutoBridge",
    "GPTModel",
    "GPTModelProvider",
    "Gemma3ModelProvider",
    "Gemma3ModelProvider1B",
    "Llama3ModelProvider8B",
    "Llama31ModelProvider8B",
    "Llama32ModelProvider1B",
    "Llama32ModelProvider3B",
    "LlamaModelProvider",
    "MistralModelProvider",
    "MistralModelProvider7B",
    "PackedSeqParams",
    "Qwen2ModelProvider",
    "Qwen25ModelProvider500M",
    "Qwen25ModelProvider1P5B",
    "Qwen25ModelProvider7B",
    "Qwen3ModelProvider",
    "Qwen3ModelProvider600M",
    "Qwen3ModelProvider1P7B",
    "Qwen3ModelProvider4B",
    "Qwen3ModelProvider8B",
    "Qwen3ModelProvider14B",
    "Qwen3ModelProvider32B",
    "get_packed_seq_params",
]


def __getattr__(name: str) -> Any:
    """Import `AutoBridge` lazily (PEP 562)."""
    if name == "AutoBridge":
        from megatron.bridge.models.conversion.auto_bridge import AutoBridge

        return AutoBridge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
