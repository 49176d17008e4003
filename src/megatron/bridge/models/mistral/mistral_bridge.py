"""The Mistral family (`MistralForCausalLM`) for the bridge: config.json both ways, tensor names.

Mistral is Llama's layout without biases, plus `sliding_window`: when set (transformers' default is
4096) every layer attends to the last W tokens, the query included, which is our `window_size`
`(W - 1, 0)` on every layer; `null` means full causal attention.
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
from megatron.bridge.models.conversion.hf_config import ConfigKeys, read_sliding_window
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.mistral.mistral_provider import MistralModelProvider, MistralModelProvider7B

__all__ = ["MISTRAL", "NAME_ROWS", "read_config", "write_config"]

NAME_ROWS = llama_style_rows(qkv_bias=False, proj_bias=False, mlp_bias=False)
"""Our names against Mistral's; `post_attention_layernorm` is the norm before the MLP."""

_DEFAULT_WINDOW = 4096  # transformers' MistralConfig default when config.json has no sliding_window key


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    """Mistral's provider fields from config.json."""
    return {**read_llama_style(keys), "window_size": read_sliding_window(keys, default=_DEFAULT_WINDOW)}


def write_config(provider: GPTModelProvider) -> dict[str, Any]:
    """Mistral's config.json keys for `provider`."""
    window = provider.window_size
    return {**write_llama_style(provider), "sliding_window": None if window is None else window[0] + 1}


MISTRAL = ModelFamily(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_type="mistral",
    providers=(MistralModelProvider, MistralModelProvider7B),
    features={key: value for key, value in PLAIN_DECODER.items() if key != "window_size"}
    | {"add_qkv_bias": False, "add_bias_linear": False},
    read_config=read_config,
    write_config=write_config,
    name_rows=NAME_ROWS,
)
"""Mistral 7B (v0.1 with its window, v0.3 without) and the models built like it."""
