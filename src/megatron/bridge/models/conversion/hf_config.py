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
from megatron.bridge.utils.errors import ConfigError, short_repr

_DEFAULT_ROPE_TYPES = ("default", None)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}
_REQUIRED = object()

MAX_SIZES = {
    "num_hidden_layers": 1024, "hidden_size": 2**17, "intermediate_size": 2**20, "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12, "head_dim": 2**12, "vocab_size": 2**24, "max_position_embeddings": 2**24,
}
"""Upper bounds of config.json's sizes, far above any published model (126 layers, hidden size 16384,
a 256k vocabulary, a 10M context): a larger value is a damaged or hostile file, and would take minutes
and gigabytes just to describe the model. Checked before anything is built."""
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


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
    """The supported architecture `config` names; `ConfigError` naming it and the supported ones otherwise."""
    names = config.get("architectures")
    if isinstance(names, str):
        names = [names]
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _invalid(source, "architectures", names, "a list of class names, e.g. [\"Qwen2ForCausalLM\"]")
    if not names:  # older configs name only the model type
        model_type = config.get("model_type")
        names = [a.name for a in SUPPORTED_ARCHITECTURES.values() if a.model_type == model_type]
        names = names or [f"model_type={short_repr(model_type)}"]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    listed = ", ".join(names)
    raise ConfigError(
        f"{source}: architecture {listed if len(listed) <= 200 else listed[:200] + '...'} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype `config.json` declares (`dtype` or `torch_dtype`), or None."""
    name = config.get("dtype") or config.get("torch_dtype")
    return _FLOAT_DTYPES.get(name) if isinstance(name, str) else None


def dtype_key(config: dict[str, Any]) -> str:
    """The key a config spells its dtype with: `dtype` (transformers 5) or `torch_dtype` (4, the default)."""
    return "dtype" if "dtype" in config else "torch_dtype"


def _invalid(source: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: {key}={short_repr(value)} is invalid: {allowed}")


class _Keys:
    """Reads config.json keys checked for JSON type and range; every error names the file and the key.

    A key that is absent or null takes its default; a key without a default is required.
    """

    def __init__(self, values: dict[str, Any], source: str, prefix: str = "") -> None:
        self.values, self.source, self.prefix = values, source, prefix

    def invalid(self, key: str, value: Any, allowed: str) -> ConfigError:
        return _invalid(self.source, self.prefix + key, value, allowed)

    def integer(self, key: str, *, maximum: int, default: Any = _REQUIRED) -> Any:
        value = self.values.get(key)
        if value is None and default is not _REQUIRED:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
            raise self.invalid(key, value, f"a positive integer up to {maximum}")
        return value

    def number(self, key: str, *, default: float | None) -> Any:
        """A positive finite number."""
        value = self.values.get(key)
        if value is None:
            return default
        try:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) < math.inf
        except OverflowError:  # an integer beyond the float range
            valid = False
        if not valid:
            raise self.invalid(key, value, "a positive number")
        return value

    def probability(self, key: str) -> float:
        """A number in [0, 1); absent means 0."""
        value = self.values.get(key)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise self.invalid(key, value, "a number in [0, 1)")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.values.get(key, False)
        if value is not None and not isinstance(value, bool):
            raise self.invalid(key, value, "true or false")
        return bool(value)

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.values.get(key)
        if value is not None and not isinstance(value, str):
            raise self.invalid(key, value, "a string")
        return default if value is None else value

    def section(self, key: str) -> _Keys:
        value = self.values.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.invalid(key, value, "an object (or null)")
        return _Keys(value or {}, self.source, f"{self.prefix}{key}.")


def _rope(keys: _Keys) -> tuple[float, dict[str, Any] | None]:
    parameters = keys.section("rope_parameters")
    scaling = keys.section("rope_scaling")
    if not scaling.values:  # transformers 5 keeps the scaling with the base in rope_parameters
        scaling = parameters
    theta = keys.number("rope_theta", default=None)
    if theta is None:
        theta = parameters.number("rope_theta", default=10000.0)
    rope_type = scaling.text("rope_type") if "rope_type" in scaling.values else scaling.text("type")
    factor = scaling.number("partial_rotary_factor", default=1.0)
    if factor != 1.0:
        raise ConfigError(f"{keys.source}: partial_rotary_factor={factor} is not supported (1.0 only)")
    theta = int(theta) if float(theta).is_integer() else float(theta)
    if rope_type in _DEFAULT_ROPE_TYPES:
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"{keys.source}: rope type {short_repr(rope_type)} is not supported; supported: default, llama3"
        )
    canonical: dict[str, Any] = {"rope_type": "llama3"}
    for key in _LLAMA3_KEYS[:-1]:
        canonical[key] = scaling.number(key, default=None)
    original = "original_max_position_embeddings"
    canonical[original] = scaling.integer(original, maximum=MAX_SIZES["max_position_embeddings"], default=None)
    if canonical[original] is None:
        canonical[original] = keys.integer("max_position_embeddings", maximum=MAX_SIZES["max_position_embeddings"],
                                           default=None)
    for key in _LLAMA3_KEYS:
        if canonical[key] is None:
            raise ConfigError(f"{keys.source}: llama3 rope scaling needs {key}")
    return theta, canonical


def _biases(arch: Architecture, keys: _Keys) -> tuple[bool, bool]:
    if arch.name == "Qwen2ForCausalLM":
        return True, False  # Qwen2: biased q/k/v, nothing else
    attention, mlp = keys.flag("attention_bias"), keys.flag("mlp_bias")
    if attention != mlp:
        raise ConfigError(
            f"{keys.source}: attention_bias={attention} with mlp_bias={mlp} is not supported "
            "(the output projection and the MLP share one bias setting here)"
        )
    return attention, attention


def _check_supported_features(keys: _Keys) -> None:
    activation = keys.text("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"{keys.source}: hidden_act={short_repr(activation)} is not supported (silu only)")
    if keys.flag("use_sliding_window"):
        raise ConfigError(f"{keys.source}: use_sliding_window=true is not supported (full attention only)")


def _check_dtype(keys: _Keys) -> None:
    for key in ("dtype", "torch_dtype"):
        name = keys.text(key)
        if name is not None and name not in _FLOAT_DTYPES:
            raise keys.invalid(key, name, f"one of {', '.join(_FLOAT_DTYPES)}")


def _sizes(keys: _Keys) -> dict[str, Any]:
    """The provider's size fields, each within `MAX_SIZES` and consistent with the others."""
    size = {}
    for key, limit in MAX_SIZES.items():
        size[key] = keys.integer(key, maximum=limit, default=None if key in _OPTIONAL_SIZES else _REQUIRED)
    heads, groups = size["num_attention_heads"], size["num_key_value_heads"] or size["num_attention_heads"]
    if heads % groups != 0:
        raise keys.invalid("num_key_value_heads", groups, f"a divisor of num_attention_heads={heads}")
    head_dim = size["head_dim"]
    if head_dim is None and size["hidden_size"] % heads != 0:
        raise keys.invalid("hidden_size", size["hidden_size"],
                           f"a multiple of num_attention_heads={heads} (or set head_dim)")
    if (head_dim or size["hidden_size"] // heads) % 2 != 0:
        key = "head_dim" if head_dim else "hidden_size"
        raise keys.invalid(key, size[key], f"an even head dimension (rotary embeddings) with num_attention_heads="
                                           f"{heads}")
    return dict(
        num_layers=size["num_hidden_layers"], hidden_size=size["hidden_size"],
        ffn_hidden_size=size["intermediate_size"], num_attention_heads=heads, num_query_groups=groups,
        kv_channels=head_dim, vocab_size=size["vocab_size"],
        # The model's context length; training usually sets a shorter seq_length (with dataset.seq_length).
        seq_length=size["max_position_embeddings"] or 4096,
    )


def provider_from_hf_config(config: dict[str, Any], source: str = "config.json") -> GPTModelProvider:
    """The provider (of the architecture's class) that `config` describes.

    Every key read is checked for its JSON type and range first (`ConfigError` naming `source` and the
    key); nothing is built here.
    """
    arch = architecture_of(config, source)
    keys = _Keys(config, source)
    _check_supported_features(keys)
    _check_dtype(keys)
    sizes = _sizes(keys)
    theta, scaling = _rope(keys)
    qkv_bias, linear_bias = _biases(arch, keys)
    provider = arch.provider_class(
        **sizes,
        # Pad to a divisor of the vocabulary, i.e. not at all: logits keep Hugging Face's shape.
        make_vocab_size_divisible_by=math.gcd(sizes["vocab_size"], 128),
        normalization="RMSNorm",
        layernorm_epsilon=keys.number("rms_norm_eps", default=1e-6),
        gated_linear_unit=True,
        add_qkv_bias=qkv_bias,
        add_bias_linear=linear_bias,
        rotary_base=theta,
        rope_scaling=scaling,
        share_embeddings_and_output_weights=keys.flag("tie_word_embeddings"),
        init_method_std=keys.number("initializer_range", default=0.02),
        attention_dropout=keys.probability("attention_dropout"),
        hidden_dropout=0.0,
    )
    try:
        provider.validate()
    except ValueError as err:
        raise ConfigError(f"{source} describes an unsupported model: {err}") from err
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
