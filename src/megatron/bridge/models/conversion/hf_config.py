"""The typed, hardened `config.json` readers (and writer helpers) every family's config mapping is built from.

A family (see `models/registry.py`) maps its own keys; the keys the decoder families share are read
here, each checked for its JSON type and range before anything is built:

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
| rope_scaling / rope_parameters           | rope_scaling (llama3 or linear)       |
| tie_word_embeddings                      | share_embeddings_and_output_weights   |
| initializer_range                        | init_method_std                       |
| attention_dropout                        | attention_dropout                     |

Both the transformers 4 spelling (`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5 spelling
(`rope_parameters`, `dtype`) are read; the writers produce the 5 spelling, as `transformers` 5 does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.utils.errors import ConfigError, short_repr

__all__ = [
    "MAX_SIZES",
    "ConfigKeys",
    "check_dtype",
    "config_dtype",
    "dtype_key",
    "dtype_name",
    "read_activation",
    "read_common",
    "read_layer_types",
    "read_rope",
    "read_rope_section",
    "read_sizes",
    "read_sliding_window",
    "refuse_sliding_windows",
    "rope_parameters",
    "write_common",
    "write_layer_types",
]

_DEFAULT_ROPE_TYPES = ("default", None)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}
_REQUIRED = object()
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
"""The two entries of transformers' `layer_types`."""

MAX_SIZES = {
    "num_hidden_layers": 1024, "hidden_size": 2**17, "intermediate_size": 2**20, "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12, "head_dim": 2**12, "vocab_size": 2**24, "max_position_embeddings": 2**24,
}
"""Upper bounds of config.json's sizes, far above any published model (126 layers, hidden size 16384,
a 256k vocabulary, a 10M context): a larger value is a damaged or hostile file, and would take minutes
and gigabytes just to describe the model. Checked before anything is built."""
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype `config.json` declares (`dtype` or `torch_dtype`), or None."""
    name = config.get("dtype") or config.get("torch_dtype")
    return _FLOAT_DTYPES.get(name) if isinstance(name, str) else None


def dtype_key(config: dict[str, Any]) -> str:
    """The key a config spells its dtype with: `dtype` (transformers 5) or `torch_dtype` (4, the default)."""
    return "dtype" if "dtype" in config else "torch_dtype"


def dtype_name(dtype: torch.dtype) -> str:
    """config.json's name of `dtype`, e.g. `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def _invalid(source: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: {key}={short_repr(value)} is invalid: {allowed}")


class ConfigKeys:
    """Reads config.json keys checked for JSON type and range; every error names the file and the key.

    A key that is absent or null takes its default; a key without a default is required.
    """

    def __init__(self, values: dict[str, Any], source: str, prefix: str = "") -> None:
        self.values, self.source, self.prefix = values, source, prefix

    def invalid(self, key: str, value: Any, allowed: str) -> ConfigError:
        """The error for `key` holding `value` where `allowed` was expected."""
        return _invalid(self.source, self.prefix + key, value, allowed)

    def unsupported(self, key: str, value: Any, why: str) -> ConfigError:
        """The error for a valid `value` of `key` that the model here cannot reproduce."""
        shown = "true" if value is True else short_repr(value)
        return ConfigError(f"{self.source}: {self.prefix}{key}={shown} is not supported ({why})")

    def integer(self, key: str, *, maximum: int, default: Any = _REQUIRED) -> Any:
        """A positive integer up to `maximum`."""
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

    def flag(self, key: str, default: bool = False) -> bool:
        """`true` or `false`."""
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.invalid(key, value, "true or false")
        return value

    def text(self, key: str, default: str | None = None) -> str | None:
        """A string."""
        value = self.values.get(key)
        if value is not None and not isinstance(value, str):
            raise self.invalid(key, value, "a string")
        return default if value is None else value

    def section(self, key: str) -> ConfigKeys:
        """The object under `key` (empty when absent or null), read with the same checks."""
        value = self.values.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.invalid(key, value, "an object (or null)")
        return ConfigKeys(value or {}, self.source, f"{self.prefix}{key}.")

    def refuse(self, key: str, why: str) -> None:
        """Refuse `key: true` (a feature the model here does not have); absent, null or false pass."""
        if self.flag(key):
            raise self.unsupported(key, True, why)

    def refuse_value(self, key: str, why: str) -> None:
        """Refuse any non-null value of `key`."""
        if self.values.get(key) is not None:
            raise self.unsupported(key, self.values[key], why)


def check_dtype(keys: ConfigKeys) -> None:
    """`dtype` / `torch_dtype`, when present, names a floating-point dtype."""
    for key in ("dtype", "torch_dtype"):
        name = keys.text(key)
        if name is not None and name not in _FLOAT_DTYPES:
            raise keys.invalid(key, name, f"one of {', '.join(_FLOAT_DTYPES)}")


def read_activation(keys: ConfigKeys, key: str, supported: Mapping[str, str], default: str) -> str:
    """Our `activation_func` for config.json's activation name under `key` (`hidden_act`, Gemma's
    `hidden_activation`); `supported` maps the family's Hugging Face names to ours."""
    name = keys.text(key, default)
    if name not in supported:
        raise keys.unsupported(key, name, f"{', '.join(supported)} only")
    return supported[name]


def read_sizes(keys: ConfigKeys, *, head_dim_default: int | None = None) -> dict[str, Any]:
    """The provider's size fields, each within `MAX_SIZES` and consistent with the others.

    `head_dim_default` is the family's head dimension when config.json has none (None: hidden / heads).
    """
    size = {}
    for key, limit in MAX_SIZES.items():
        size[key] = keys.integer(key, maximum=limit, default=None if key in _OPTIONAL_SIZES else _REQUIRED)
    heads, groups = size["num_attention_heads"], size["num_key_value_heads"] or size["num_attention_heads"]
    if heads % groups != 0:
        raise keys.invalid("num_key_value_heads", groups, f"a divisor of num_attention_heads={heads}")
    head_dim = size["head_dim"] or head_dim_default
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
        # Pad to a divisor of the vocabulary, i.e. not at all: logits keep Hugging Face's shape.
        make_vocab_size_divisible_by=math.gcd(size["vocab_size"], 128),
        # The model's context length; training usually sets a shorter seq_length (with dataset.seq_length).
        seq_length=size["max_position_embeddings"] or 4096,
    )


def read_common(keys: ConfigKeys, *, head_dim_default: int | None = None, tied_default: bool = False
                ) -> dict[str, Any]:
    """The provider fields every decoder family reads the same way: sizes, norm epsilon, tying, init, dropout."""
    check_dtype(keys)
    return dict(
        **read_sizes(keys, head_dim_default=head_dim_default),
        layernorm_epsilon=keys.number("rms_norm_eps", default=1e-6),
        share_embeddings_and_output_weights=keys.flag("tie_word_embeddings", tied_default),
        init_method_std=keys.number("initializer_range", default=0.02),
        attention_dropout=keys.probability("attention_dropout"),
        hidden_dropout=0.0,
    )


def _as_base(theta: float) -> int | float:
    return int(theta) if float(theta).is_integer() else float(theta)


def read_rope_section(section: ConfigKeys, *, theta: Any, theta_default: float, rope_types: Sequence[str],
                      keys: ConfigKeys) -> tuple[int | float, dict[str, Any] | None]:
    """`(rotary_base, rope_scaling)` from one RoPE section (`rope_parameters`, `rope_scaling`, or one layer
    type's entry of Gemma's nested `rope_parameters`).

    `theta` is a base given elsewhere (transformers 4's top-level `rope_theta`), else the section's own or
    `theta_default`; `rope_types` are the scaling types the family supports besides `default`; `keys` is
    the whole config (llama3's `original_max_position_embeddings` falls back to its
    `max_position_embeddings`).
    """
    if theta is None:
        theta = section.number("rope_theta", default=theta_default)
    rope_type = section.text("rope_type") if "rope_type" in section.values else section.text("type")
    partial = section.number("partial_rotary_factor", default=1.0)
    if partial != 1.0:
        raise ConfigError(f"{keys.source}: partial_rotary_factor={partial} is not supported (1.0 only)")
    if rope_type in _DEFAULT_ROPE_TYPES:
        return _as_base(theta), None
    if rope_type not in rope_types:
        supported = ", ".join(("default", *rope_types))
        raise ConfigError(f"{keys.source}: rope type {short_repr(rope_type)} is not supported; supported: {supported}")
    if rope_type == "linear":
        factor = section.number("factor", default=None)
        if factor is None:
            raise ConfigError(f"{keys.source}: linear rope scaling needs factor")
        return _as_base(theta), {"rope_type": "linear", "factor": factor}
    return _as_base(theta), _llama3_scaling(section, keys)


def _llama3_scaling(section: ConfigKeys, keys: ConfigKeys) -> dict[str, Any]:
    canonical: dict[str, Any] = {"rope_type": "llama3"}
    for key in _LLAMA3_KEYS[:-1]:
        canonical[key] = section.number(key, default=None)
    original = "original_max_position_embeddings"
    canonical[original] = section.integer(original, maximum=MAX_SIZES["max_position_embeddings"], default=None)
    if canonical[original] is None:
        canonical[original] = keys.integer("max_position_embeddings", maximum=MAX_SIZES["max_position_embeddings"],
                                           default=None)
    for key in _LLAMA3_KEYS:
        if canonical[key] is None:
            raise ConfigError(f"{keys.source}: llama3 rope scaling needs {key}")
    return canonical


def read_rope(keys: ConfigKeys, *, rope_types: Sequence[str] = ("llama3",)) -> dict[str, Any]:
    """`rotary_base` and `rope_scaling` of a family with one RoPE for every layer.

    transformers 5 keeps the base and the scaling together in `rope_parameters`; 4 wrote `rope_theta`
    and `rope_scaling` at the top level. Either is read; a top-level key wins.
    """
    parameters = keys.section("rope_parameters")
    scaling = keys.section("rope_scaling")
    section = scaling if scaling.values else parameters
    theta = keys.number("rope_theta", default=None)
    if theta is None:
        theta = parameters.number("rope_theta", default=10000.0)
    base, rope_scaling = read_rope_section(section, theta=theta, theta_default=10000.0, rope_types=rope_types,
                                           keys=keys)
    return dict(rotary_base=base, rope_scaling=rope_scaling)


def read_layer_types(keys: ConfigKeys, num_layers: int) -> list[bool] | None:
    """`layer_types` as one flag per layer (True: sliding window), or None when config.json has none."""
    value = keys.values.get("layer_types")
    if value is None:
        return None
    allowed = (FULL_ATTENTION, SLIDING_ATTENTION)
    if not isinstance(value, list) or len(value) != num_layers or any(entry not in allowed for entry in value):
        raise keys.invalid("layer_types", value, f"a list of num_hidden_layers={num_layers} entries, each "
                                                 f"{FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}")
    return [entry == SLIDING_ATTENTION for entry in value]


def refuse_sliding_windows(keys: ConfigKeys, num_layers: int) -> None:
    """Refuse Qwen's optional sliding window: `use_sliding_window: true`, or `layer_types` naming one."""
    keys.refuse("use_sliding_window", "full attention only")
    if any(read_layer_types(keys, num_layers) or ()):
        raise keys.unsupported("layer_types", keys.values["layer_types"], f"{FULL_ATTENTION} layers only")


def read_sliding_window(keys: ConfigKeys, default: int | None) -> tuple[int, int] | None:
    """config.json's `sliding_window` W (keys `i-W+1 .. i`) as our inclusive `window_size` `(W - 1, 0)`.

    `default` is the family's window when the key is absent; an explicit `null` means no window.
    """
    if "sliding_window" in keys.values:
        default = None
    window = keys.integer("sliding_window", maximum=MAX_SIZES["max_position_embeddings"], default=default)
    return None if window is None else (window - 1, 0)


# ------------------------------------------------------------------------------------------- writing


def write_common(provider: GPTModelProvider) -> dict[str, Any]:
    """The config.json keys every decoder family writes the same way (the inverse of `read_common`)."""
    return {
        "hidden_size": provider.hidden_size,
        "intermediate_size": provider.resolved_ffn_hidden_size,
        "num_hidden_layers": provider.num_layers,
        "num_attention_heads": provider.num_attention_heads,
        "num_key_value_heads": provider.resolved_num_query_groups,
        "head_dim": provider.resolved_kv_channels,
        "vocab_size": provider.padded_vocab_size,
        "max_position_embeddings": provider.seq_length,
        "rms_norm_eps": provider.layernorm_epsilon,
        "tie_word_embeddings": provider.share_embeddings_and_output_weights,
        "initializer_range": provider.init_method_std,
        "attention_dropout": provider.attention_dropout,
        "use_cache": True,
    }


def rope_parameters(base: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for one RoPE: the base with the scaling's keys."""
    if not scaling:
        return {"rope_theta": float(base), "rope_type": "default"}
    return {"rope_theta": float(base), **scaling}


def write_layer_types(windowed: Sequence[bool]) -> list[str]:
    """transformers' `layer_types` for our per-layer window flags."""
    return [SLIDING_ATTENTION if flag else FULL_ATTENTION for flag in windowed]
