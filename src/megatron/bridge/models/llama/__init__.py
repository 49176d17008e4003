"""The Llama family (`LlamaForCausalLM`): Llama 3, 3.1 and 3.2 sizes (Llama 2 folders convert as well).

The providers are importable from here; the Hugging Face side (config.json and tensor names) lives in
`llama_bridge`, loaded only by the conversion code.
"""

from megatron.bridge.models.llama.llama_provider import (
    Llama3ModelProvider8B,
    Llama31ModelProvider8B,
    Llama32ModelProvider1B,
    Llama32ModelProvider3B,
    LlamaModelProvider,
    llama3_rope_scaling,
)

__all__ = [
    "LlamaModelProvider",
    "Llama32ModelProvider1B",
    "Llama32ModelProvider3B",
    "Llama3ModelProvider8B",
    "Llama31ModelProvider8B",
    "llama3_rope_scaling",
]
