"""Hugging Face `config.json` <-> model provider, for the supported architectures.

| config.json                              | provider field                        |
|------------------------------------------|---------------------------------------|
| num_hidden_layers                        | num_layers                            |
| hidden_size                              | hidden_size                           |
| intermediate_size                        | ffn_hidden_size                       |
| num_attention_heads                      | num_attention_heads                   |
| num_key_value_heads                      | num_query_groups                      |
| head_dim                                 | kv_channels                           |
| vocab_size                               | vocab_size (padded to itself)         |
| max_position_embeddings                  | seq_length                            |
| rms_norm_eps                             | layernorm_epsilon                     |
| rope_theta / rope_parameters.rope_theta  | rotary_base                           |
| rope_scaling / rope_parameters (llama3)  | rope_scaling                          |
| tie_word_embeddings                      | share_embeddings_and_output_weights   |
| attention_bias (Llama; Qwen2: always)    | add_qkv_bias                          |
| attention_bias and mlp_bias (Llama)      | add_bias_linear                       |
| initializer_range                        | init_method_std                       |
| attention_dropout                        | attention_dropout                     |

Both the transformers 4 spelling (`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5 spelling
(`rope_parameters`, `dtype`) are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.llama import LlamaModelProvider
from megatron.bridge.models.qwen import Qwen2ModelProvider

_DEFAULT_ROPE_TYPES = ("default", None)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face architecture the bridge converts, and the provider class that describes it."""

    name: str
    """The `architectures` entry, e.g. `Qwen2ForCausalLM`."""
    model_type: str
    """The `model_type` entry, e.g. `qwen2`."""
    provider_class: type[GPTModelProvider]
    """The provider built for it."""


SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("Qwen2ForCausalLM", "qwen2", Qwen2ModelProvider),
        Architecture("LlamaForCausalLM", "llama", LlamaModelProvider),
    )
}


def architecture_of(config: dict[str, Any], source: str) -> Architecture:
    """The supported architecture `config` names; `ValueError` naming it and the supported ones otherwise."""
    names = config.get("architectures")
    if not names:  # older configs name only the model type
        names = [a.name for a in SUPPORTED_ARCHITECTURES.values() if a.model_type == config.get("model_type")]
        names = names or [f"model_type={config.get('model_type')!r}"]
    if not isinstance(names, list):
        names = [names]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    raise ValueError(
        f"{source}: architecture {', '.join(map(str, names))} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype `config.json` declares (`dtype` or `torch_dtype`), or None."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def dtype_key(config: dict[str, Any]) -> str:
    """The key a config spells its dtype with: `dtype` (transformers 5) or `torch_dtype` (4, the default)."""
    return "dtype" if "dtype" in config else "torch_dtype"


def _require(config: dict[str, Any], key: str, source: str) -> Any:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {key}={value!r} is invalid: a positive integer")
    return value


def _rope(config: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or parameters
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        factor = scaling["partial_rotary_factor"]
        raise ValueError(f"{source}: partial_rotary_factor={factor} is not supported (1.0 only)")
    theta = int(theta) if float(theta).is_integer() else float(theta)
    if rope_type in _DEFAULT_ROPE_TYPES:
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; supported: default, llama3")
    canonical: dict[str, Any] = {"rope_type": "llama3"}
    for key in _LLAMA3_KEYS:
        value = scaling.get(key, config.get("max_position_embeddings") if key.startswith("original") else None)
        if value is None:
            raise ValueError(f"{source}: llama3 rope scaling needs {key}")
        canonical[key] = value
    return theta, canonical


def _biases(arch: Architecture, config: dict[str, Any], source: str) -> tuple[bool, bool]:
    if arch.name == "Qwen2ForCausalLM":
        return True, False  # Qwen2: biased q/k/v, nothing else
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention != mlp:
        raise ValueError(
            f"{source}: attention_bias={attention} with mlp_bias={mlp} is not supported "
            "(the output projection and the MLP share one bias setting here)"
        )
    return attention, attention


def _check_supported_features(arch: Architecture, config: dict[str, Any], source: str) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={config['hidden_act']!r} is not supported (silu only)")
    if config.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (full attention only)")


def provider_from_hf_config(config: dict[str, Any], source: str = "config.json") -> GPTModelProvider:
    """The provider (of the architecture's class) that `config` describes; `ValueError` naming any bad field."""
    arch = architecture_of(config, source)
    _check_supported_features(arch, config, source)
    heads = _require(config, "num_attention_heads", source)
    vocab = _require(config, "vocab_size", source)
    theta, scaling = _rope(config, source)
    qkv_bias, linear_bias = _biases(arch, config, source)
    provider = arch.provider_class(
        num_layers=_require(config, "num_hidden_layers", source),
        hidden_size=_require(config, "hidden_size", source),
        ffn_hidden_size=_require(config, "intermediate_size", source),
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=config.get("head_dim") or None,
        vocab_size=vocab,
        # Pad to a divisor of the vocabulary, i.e. not at all: logits keep Hugging Face's shape.
        make_vocab_size_divisible_by=math.gcd(vocab, 128),
        # The model's context length; training usually sets a shorter seq_length (with dataset.seq_length).
        seq_length=config.get("max_position_embeddings") or 4096,
        normalization="RMSNorm",
        layernorm_epsilon=config.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        add_qkv_bias=qkv_bias,
        add_bias_linear=linear_bias,
        rotary_base=theta,
        rope_scaling=scaling,
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        init_method_std=config.get("initializer_range", 0.02),
        attention_dropout=config.get("attention_dropout", 0.0) or 0.0,
        hidden_dropout=0.0,
    )
    try:
        provider.validate()
    except ValueError as err:
        raise ValueError(f"{source} describes an unsupported model: {err}") from err
    return provider


def architecture_for_provider(provider: GPTModelProvider) -> Architecture:
    """The Hugging Face architecture a model of `provider` is saved as; `ValueError` when there is none."""
    if provider.normalization != "RMSNorm" or not provider.gated_linear_unit:
        raise ValueError(
            f"a model with normalization={provider.normalization!r} and gated_linear_unit="
            f"{provider.gated_linear_unit} has no Hugging Face equivalent here (RMSNorm and SwiGLU only)"
        )
    if isinstance(provider, Qwen2ModelProvider) or (provider.add_qkv_bias and not provider.add_bias_linear):
        if not provider.add_qkv_bias or provider.add_bias_linear:
            raise ValueError("a Qwen2 model needs add_qkv_bias=True and add_bias_linear=False")
        return SUPPORTED_ARCHITECTURES["Qwen2ForCausalLM"]
    if provider.add_qkv_bias != provider.add_bias_linear:
        raise ValueError("a Llama model needs add_qkv_bias == add_bias_linear (attention_bias and mlp_bias)")
    return SUPPORTED_ARCHITECTURES["LlamaForCausalLM"]


def hf_config_from_provider(provider: GPTModelProvider, dtype: torch.dtype) -> dict[str, Any]:
    """A `config.json` for a model of `provider`, when no original config is at hand.

    Written in the transformers 4 spelling, which transformers 5 still reads.
    """
    arch = architecture_for_provider(provider)
    config: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": arch.model_type,
        "hidden_act": "silu",
        "hidden_size": provider.hidden_size,
        "intermediate_size": provider.resolved_ffn_hidden_size,
        "num_hidden_layers": provider.num_layers,
        "num_attention_heads": provider.num_attention_heads,
        "num_key_value_heads": provider.resolved_num_query_groups,
        "head_dim": provider.resolved_kv_channels,
        "vocab_size": provider.padded_vocab_size,
        "max_position_embeddings": provider.seq_length,
        "rms_norm_eps": provider.layernorm_epsilon,
        "rope_theta": float(provider.rotary_base),
        "rope_scaling": dict(provider.rope_scaling) if provider.rope_scaling else None,
        "tie_word_embeddings": provider.share_embeddings_and_output_weights,
        "initializer_range": provider.init_method_std,
        "attention_dropout": provider.attention_dropout,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if arch.name == "LlamaForCausalLM":
        config.update(attention_bias=provider.add_qkv_bias, mlp_bias=provider.add_bias_linear)
    else:
        config.update(use_sliding_window=False)
    return config
