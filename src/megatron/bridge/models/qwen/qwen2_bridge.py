"""The Qwen2 / Qwen2.5 family (`Qwen2ForCausalLM`) for the bridge: config.json both ways, tensor names.

Qwen2 always biases q, k and v and nothing else; it has no config key for that. Its optional sliding
window (`use_sliding_window`) is used by no published model and is refused.
"""

from __future__ import annotations

from typing import Any

from megatron.bridge.models.conversion.family import (
    PLAIN_DECODER,
    ModelFamily,
    llama_style_rows,
    read_llama_style,
    write_llama_style,
)
from megatron.bridge.models.conversion.hf_config import ConfigKeys, refuse_sliding_windows, write_layer_types
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.qwen.qwen2_provider import (
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)

__all__ = ["NAME_ROWS", "QWEN2", "read_config", "write_config"]

NAME_ROWS = llama_style_rows(qkv_bias=True, proj_bias=False, mlp_bias=False)
"""Our names against Qwen2's; `post_attention_layernorm` is the norm before the MLP."""


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    """Qwen2's provider fields from config.json."""
    fields = read_llama_style(keys)
    refuse_sliding_windows(keys, fields["num_layers"])
    return fields


def write_config(provider: GPTModelProvider) -> dict[str, Any]:
    """Qwen2's config.json keys for `provider`."""
    return {**write_llama_style(provider), "use_sliding_window": False, "sliding_window": None,
            "layer_types": write_layer_types([False] * provider.num_layers)}


QWEN2 = ModelFamily(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_type="qwen2",
    providers=(Qwen2ModelProvider, Qwen25ModelProvider500M, Qwen25ModelProvider1P5B, Qwen25ModelProvider7B),
    features={**PLAIN_DECODER, "add_qkv_bias": True, "add_bias_linear": False},
    read_config=read_config,
    write_config=write_config,
    name_rows=NAME_ROWS,
)
"""Qwen2 and Qwen2.5."""
