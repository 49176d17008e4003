"""The Qwen families: Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`).

The providers are importable from here; each family's Hugging Face side (config.json and tensor
names) lives in `qwen2_bridge` / `qwen3_bridge`, loaded only by the conversion code.
"""

from megatron.bridge.models.qwen.qwen2_provider import (
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)
from megatron.bridge.models.qwen.qwen3_provider import (
    Qwen3ModelProvider,
    Qwen3ModelProvider1P7B,
    Qwen3ModelProvider4B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider14B,
    Qwen3ModelProvider32B,
    Qwen3ModelProvider600M,
)

__all__ = [
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
]
