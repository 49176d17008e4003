"""The Llama family (`LlamaForCausalLM`) for the bridge: config.json both ways, tensor names.

Llama's `attention_bias` biases q, k, v and o, its `mlp_bias` the MLP; our decoder shares one setting
between o and the MLP, so the two keys must agree. RoPE is plain or Llama 3.1's `llama3` scaling.
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
from megatron.bridge.models.conversion.hf_config import ConfigKeys
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.llama.llama_provider import (
    Llama3ModelProvider8B,
    Llama31ModelProvider8B,
    Llama32ModelProvider1B,
    Llama32ModelProvider3B,
    LlamaModelProvider,
)
from megatron.bridge.utils.errors import ConfigError, config_error

__all__ = ["LLAMA", "NAME_ROWS", "read_config", "write_config"]

NAME_ROWS = llama_style_rows(qkv_bias=True, proj_bias=True, mlp_bias=True)
"""Our names against Llama's (biases only with `attention_bias` / `mlp_bias`); `post_attention_layernorm`
is the norm before the MLP."""


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    """Llama's provider fields from config.json."""
    fields = read_llama_style(keys)
    keys.refuse("use_sliding_window", "full attention only")
    attention, mlp = keys.flag("attention_bias"), keys.flag("mlp_bias")
    if attention != mlp:
        raise ConfigError(
            f"{keys.source}: attention_bias={attention} with mlp_bias={mlp} is not supported "
            "(the output projection and the MLP share one bias setting here)"
        )
    return {**fields, "add_qkv_bias": attention, "add_bias_linear": attention}


def write_config(provider: GPTModelProvider) -> dict[str, Any]:
    """Llama's config.json keys for `provider`."""
    if provider.add_qkv_bias != provider.add_bias_linear:
        raise config_error("model.add_qkv_bias", provider.add_qkv_bias,
                           f"equal to model.add_bias_linear={provider.add_bias_linear} in a LlamaForCausalLM model "
                           "(its attention_bias covers q, k, v and o alike)")
    return {**write_llama_style(provider), "attention_bias": provider.add_qkv_bias,
            "mlp_bias": provider.add_bias_linear}


LLAMA = ModelFamily(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_type="llama",
    providers=(LlamaModelProvider, Llama32ModelProvider1B, Llama32ModelProvider3B, Llama3ModelProvider8B,
               Llama31ModelProvider8B),
    features=PLAIN_DECODER,
    read_config=read_config,
    write_config=write_config,
    name_rows=NAME_ROWS,
)
"""Llama 2, 3, 3.1 and 3.2."""
