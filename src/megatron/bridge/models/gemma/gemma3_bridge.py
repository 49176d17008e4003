"""The Gemma 3 text family (`Gemma3ForCausalLM`) for the bridge: config.json both ways, tensor names.

| config.json                                   | provider field                                    |
|-----------------------------------------------|---------------------------------------------------|
| hidden_activation (`gelu_pytorch_tanh` only)  | activation_func `gelu_tanh`                       |
| query_pre_attn_scalar (default 256)           | softmax_scale = query_pre_attn_scalar ** -0.5     |
| sliding_window W                              | window_size (W - 1, 0)                            |
| layer_types / sliding_window_pattern N        | window_attn_skip_freq N (or a 0/1 list per layer) |
| rope_parameters.full_attention                | rotary_base, rope_scaling (default or linear)     |
| rope_parameters.sliding_attention             | rotary_base_local (default RoPE only)             |

transformers 4's `rope_theta`, `rope_scaling` (global layers) and `rope_local_base_freq` are read as
well. Refused: `attn_logit_softcapping` or `final_logit_softcapping` other than null,
`use_bidirectional_attention`, `attention_bias`, and a `model_type` other than `gemma3_text` (the
multimodal `gemma3` nests its text model).

Names: Gemma's `post_attention_layernorm` normalises the attention *output* (our
`post_self_attn_layernorm`); the norm before the MLP is its `pre_feedforward_layernorm`.
"""

from __future__ import annotations

import math
from typing import Any

from megatron.bridge.models.conversion.family import PLAIN_DECODER, ModelFamily
from megatron.bridge.models.conversion.hf_config import (
    MAX_SIZES,
    ConfigKeys,
    read_activation,
    read_common,
    read_layer_types,
    read_rope_section,
    read_sliding_window,
    rope_parameters,
    write_common,
    write_layer_types,
)
from megatron.bridge.models.conversion.param_mapping import (
    EMBEDDING_ROW,
    FINAL_NORM_ROW,
    OUTPUT_ROW,
    attention_rows,
    layer_row,
    mlp_rows,
)
from megatron.bridge.models.gemma.gemma3_provider import Gemma3ModelProvider, Gemma3ModelProvider1B
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.utils.errors import config_error

__all__ = ["GEMMA3", "MODEL_TYPE", "NAME_ROWS", "read_config", "write_config"]

NAME_ROWS = (
    EMBEDDING_ROW,
    layer_row("input_layernorm.weight", "input_layernorm.weight"),
    *attention_rows(qkv_bias=False, proj_bias=False),
    layer_row("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    layer_row("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
    layer_row("post_self_attn_layernorm.weight", "post_attention_layernorm.weight"),
    layer_row("pre_mlp_layernorm.weight", "pre_feedforward_layernorm.weight"),
    *mlp_rows(bias=False),
    layer_row("post_mlp_layernorm.weight", "post_feedforward_layernorm.weight"),
    FINAL_NORM_ROW,
    OUTPUT_ROW,
)
"""Our names against Gemma 3's (all norms zero-centred on both sides, so the values map verbatim)."""

MODEL_TYPE = "gemma3_text"
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}
_DEFAULT_PATTERN, _DEFAULT_WINDOW, _DEFAULT_SCALAR = 6, 4096, 256  # transformers' Gemma3TextConfig defaults
_GLOBAL_THETA, _LOCAL_THETA = 1_000_000.0, 10_000.0


def _pattern(keys: ConfigKeys) -> int:
    """`sliding_window_pattern` (transformers 5 also writes `_sliding_window_pattern`): every N-th layer is global."""
    for key in ("sliding_window_pattern", "_sliding_window_pattern"):
        value = keys.integer(key, maximum=MAX_SIZES["num_hidden_layers"] + 1, default=None)
        if value is not None:
            return value
    return _DEFAULT_PATTERN


def _windows(keys: ConfigKeys, num_layers: int) -> dict[str, Any]:
    """window_size and window_attn_skip_freq: an int when layer_types follows the pattern, else a list."""
    pattern = _pattern(keys)
    periodic = [(layer + 1) % pattern != 0 for layer in range(num_layers)]
    windowed = read_layer_types(keys, num_layers)
    windowed = periodic if windowed is None else windowed
    window = read_sliding_window(keys, default=_DEFAULT_WINDOW)
    if not any(windowed):
        return dict(window_size=None, window_attn_skip_freq=None)
    if window is None:
        raise keys.unsupported("sliding_window", None, "sliding_attention layers need a window")
    freq = pattern if windowed == periodic else [int(flag) for flag in windowed]
    return dict(window_size=window, window_attn_skip_freq=freq)


def _rope(keys: ConfigKeys, *, windowed: bool) -> dict[str, Any]:
    """RoPE of the global layers (`full_attention`) and of the windowed ones (`sliding_attention`)."""
    parameters = keys.section("rope_parameters")
    if parameters.values and not {"full_attention", "sliding_attention"} & set(parameters.values):
        raise keys.invalid("rope_parameters", parameters.values,
                           "an object with a full_attention and a sliding_attention entry")
    full, local = parameters.section("full_attention"), parameters.section("sliding_attention")
    legacy_full = keys.section("rope_scaling")  # transformers 4: scaling of the global layers only
    base, scaling = read_rope_section(
        full if full.values else legacy_full, theta=keys.number("rope_theta", default=None),
        theta_default=_GLOBAL_THETA, rope_types=("linear",), keys=keys,
    )
    local_base, _ = read_rope_section(local, theta=keys.number("rope_local_base_freq", default=None),
                                      theta_default=_LOCAL_THETA, rope_types=(), keys=keys)
    return dict(rotary_base=base, rope_scaling=scaling, rotary_base_local=local_base if windowed else None)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    """Gemma 3's provider fields from config.json."""
    model_type = keys.text("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise keys.unsupported("model_type", model_type, f"Gemma3ForCausalLM converts the text model, {MODEL_TYPE}")
    read_activation(keys, "hidden_activation", _ACTIVATIONS, "gelu_pytorch_tanh")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        keys.refuse_value(key, "Gemma 3 publishes null; no softcapping here")
    keys.refuse("use_bidirectional_attention", "causal attention only")
    keys.refuse("attention_bias", "it biases o_proj too, which needs the MLP biased as well here")
    fields = read_common(keys, head_dim_default=256, tied_default=True)
    windows = _windows(keys, fields["num_layers"])
    scalar = keys.number("query_pre_attn_scalar", default=_DEFAULT_SCALAR)
    return {**fields, **windows, **_rope(keys, windowed=windows["window_size"] is not None),
            "softmax_scale": float(scalar) ** -0.5}


def _query_pre_attn_scalar(provider: GPTModelProvider) -> int | float:
    """The `query_pre_attn_scalar` whose inverse square root is `softmax_scale`."""
    scale = provider.softmax_scale or provider.resolved_kv_channels**-0.5
    scalar = 1.0 / (scale * scale)
    return round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-9) else scalar


def write_config(provider: GPTModelProvider) -> dict[str, Any]:
    """Gemma 3's config.json keys for `provider`."""
    window, freq = provider.window_size, provider.window_attn_skip_freq
    local_base = provider.rotary_base_local
    if window is not None and local_base is None:
        raise config_error("model.rotary_base_local", None,
                           "a number in a Gemma3ForCausalLM model with model.window_size set (its windowed layers "
                           "have a RoPE base of their own)")
    config = {
        **write_common(provider),
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _query_pre_attn_scalar(provider),
        "sliding_window": None if window is None else window[0] + 1,
        "layer_types": write_layer_types(provider.window_attention_layers),
        "rope_parameters": {
            "full_attention": rope_parameters(provider.rotary_base, provider.rope_scaling),
            "sliding_attention": rope_parameters(_LOCAL_THETA if local_base is None else local_base, None),
        },
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
    }
    if isinstance(freq, int):
        config["sliding_window_pattern"] = freq
    return config


GEMMA3 = ModelFamily(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_type=MODEL_TYPE,
    providers=(Gemma3ModelProvider, Gemma3ModelProvider1B),
    features={
        **{key: PLAIN_DECODER[key] for key in ("normalization", "gated_linear_unit", "position_embedding_type")},
        "activation_func": "gelu_tanh", "qk_layernorm": True, "layernorm_zero_centered_gamma": True,
        "post_self_attn_layernorm": True, "post_mlp_layernorm": True, "scale_embeddings_by_hidden_size": True,
        "add_qkv_bias": False, "add_bias_linear": False,
    },
    read_config=read_config,
    write_config=write_config,
    name_rows=NAME_ROWS,
)
"""Gemma 3's text models (the 1B; the larger ones' text decoders are the same architecture)."""
