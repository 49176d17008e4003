"""The Qwen3 family (`Qwen3ForCausalLM`) for the bridge: config.json both ways, tensor names.

Qwen3 adds per-head `q_norm` / `k_norm` (our `q_layernorm` / `k_layernorm`) and a `head_dim` of its own
(128 when config.json has none). Its `attention_bias` would bias `o_proj` as well, which our decoder
ties to the MLP's bias, and its optional sliding window is used by no published model: both refused.
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
from megatron.bridge.models.qwen.qwen3_provider import (
    Qwen3ModelProvider,
    Qwen3ModelProvider1P7B,
    Qwen3ModelProvider4B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider14B,
    Qwen3ModelProvider32B,
    Qwen3ModelProvider600M,
)

__all__ = ["NAME_ROWS", "QWEN3", "read_config", "write_config"]

NAME_ROWS = llama_style_rows(qkv_bias=False, proj_bias=False, mlp_bias=False, qk_layernorm=True)
"""Our names against Qwen3's; `post_attention_layernorm` is the norm before the MLP."""


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    """Qwen3's provider fields from config.json."""
    fields = read_llama_style(keys, head_dim_default=128)
    keys.refuse("attention_bias", "it biases o_proj too, which needs the MLP biased as well here")
    refuse_sliding_windows(keys, fields["num_layers"])
    return fields


def write_config(provider: GPTModelProvider) -> dict[str, Any]:
    """Qwen3's config.json keys for `provider`."""
    return {**write_llama_style(provider), "attention_bias": False, "use_sliding_window": False,
            "sliding_window": None, "layer_types": write_layer_types([False] * provider.num_layers)}


QWEN3 = ModelFamily(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_type="qwen3",
    providers=(Qwen3ModelProvider, Qwen3ModelProvider600M, Qwen3ModelProvider1P7B, Qwen3ModelProvider4B,
               Qwen3ModelProvider8B, Qwen3ModelProvider14B, Qwen3ModelProvider32B),
    features={**PLAIN_DECODER, "qk_layernorm": True, "add_qkv_bias": False, "add_bias_linear": False},
    read_config=read_config,
    write_config=write_config,
    name_rows=NAME_ROWS,
)
"""The dense Qwen3 models."""
