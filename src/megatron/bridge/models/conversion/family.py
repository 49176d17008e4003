"""`ModelFamily`: what the bridge knows about one Hugging Face architecture, declared by the family's module.

A family module (e.g. `models/gemma/gemma3_bridge.py`) fills one in with its architecture names, its
provider classes, the provider fields every model of the family shares (`features`), its config.json
mapping in both directions and its table of tensor names; `models/registry.py` lists the families.
Everything here is generic: no family is named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.models.conversion.hf_config import (
    ConfigKeys,
    dtype_name,
    read_activation,
    read_common,
    read_rope,
    rope_parameters,
    write_common,
)
from megatron.bridge.models.conversion.param_mapping import (
    EMBEDDING_ROW,
    FINAL_NORM_ROW,
    OUTPUT_ROW,
    NameMapping,
    attention_rows,
    hf_name_of,
    layer_row,
    megatron_name_of,
    megatron_param_shapes,
    mlp_rows,
)
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.utils.errors import ConfigError, config_error

__all__ = [
    "PLAIN_DECODER",
    "ModelFamily",
    "llama_style_rows",
    "no_family_error",
    "read_llama_style",
    "write_llama_style",
]

PLAIN_DECODER: dict[str, Any] = dict(
    normalization="RMSNorm", gated_linear_unit=True, activation_func="silu", position_embedding_type="rope",
    qk_layernorm=False, layernorm_zero_centered_gamma=False, post_self_attn_layernorm=False,
    post_mlp_layernorm=False, scale_embeddings_by_hidden_size=False, softmax_scale=None, window_size=None,
    window_attn_skip_freq=None, rotary_base_local=None,
)
"""The features of a Llama-style decoder (RMSNorm, SwiGLU, full causal attention, nothing else); a family
starts from this and overrides what it has, leaving out the fields its config.json decides."""


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One Hugging Face architecture and everything needed to convert it, in both directions."""

    name: str
    """Short name, e.g. `qwen3`."""
    architectures: tuple[str, ...]
    """config.json's `architectures` entries this family reads; the first is the one it writes."""
    model_type: str
    """config.json's `model_type` (looked up only when `architectures` is absent)."""
    providers: tuple[type[GPTModelProvider], ...]
    """The family's provider classes: the one config.json is read into first, then the published sizes."""
    features: Mapping[str, Any]
    """Provider fields every model of the family has, whatever config.json says (an export checks them)."""
    read_config: Callable[[ConfigKeys], dict[str, Any]]
    """The other provider fields, read (and checked) from config.json."""
    write_config: Callable[[GPTModelProvider], dict[str, Any]]
    """config.json's keys for a provider, as transformers 5 writes them (all but architectures, model_type
    and dtype); raises `ValueError` naming a field the family cannot express."""
    name_rows: tuple[NameMapping, ...]
    """Our parameter names against Hugging Face's tensor names."""

    @property
    def architecture(self) -> str:
        """The architecture written into config.json."""
        return self.architectures[0]

    @property
    def provider_class(self) -> type[GPTModelProvider]:
        """The class a config.json of this family is read into."""
        return self.providers[0]

    def describe(self) -> str:
        """`name (Architecture, ProviderClass)`, for messages."""
        return f"{self.name} ({self.architecture}, {self.provider_class.__name__})"

    # ------------------------------------------------------------------------------------- config.json

    def provider_from_hf_config(self, config: dict[str, Any], source: str = "config.json") -> GPTModelProvider:
        """The provider `config` describes: every key read is checked first (`ConfigError` naming `source`
        and the key); nothing is built here."""
        fields = self.read_config(ConfigKeys(config, source))
        provider = self.provider_class(**{**self.features, **fields})
        try:
            provider.validate()
        except ValueError as err:
            raise ConfigError(f"{source} describes an unsupported model: {err}") from err
        return provider

    def check_provider(self, provider: GPTModelProvider) -> None:
        """Raise `ConfigError` naming the first field in which `provider` differs from the family's features."""
        provider.validate()
        for field, expected in self.features.items():
            value = provider.resolved_activation_func if field == "activation_func" else getattr(provider, field)
            if value != expected:
                raise config_error(f"model.{field}", value, f"{expected!r} in a {self.architecture} model")

    def hf_config_from_provider(self, provider: GPTModelProvider, dtype: torch.dtype) -> dict[str, Any]:
        """A config.json for a model of `provider` saved in `dtype`, as transformers 5 writes it."""
        self.check_provider(provider)
        config = {"architectures": [self.architecture], "model_type": self.model_type,
                  **self.write_config(provider), "dtype": dtype_name(dtype)}
        return dict(sorted(config.items()))

    # -------------------------------------------------------------------------------------- tensor names

    def to_hf_name(self, megatron_name: str) -> str:
        """The Hugging Face tensor name of our parameter `megatron_name`; `ConversionError` if it has none."""
        return hf_name_of(self.name_rows, megatron_name, owner=self.architecture)

    def to_megatron_name(self, hf_name: str) -> str | None:
        """Our parameter name for the Hugging Face tensor `hf_name`, or None when the table has no row for it."""
        return megatron_name_of(self.name_rows, hf_name)

    def hf_tensor_shapes(self, provider: GPTModelProvider) -> dict[str, torch.Size]:
        """The Hugging Face tensor names and shapes a checkpoint of `provider` holds."""
        return {self.to_hf_name(name): shape for name, shape in megatron_param_shapes(provider).items()}


# ------------------------------------------------------------------ the Llama-style part most families share


def read_llama_style(keys: ConfigKeys, *, head_dim_default: int | None = None) -> dict[str, Any]:
    """Sizes, norm, tying, init, dropout, a SiLU MLP and one RoPE (default or llama3) for every layer."""
    read_activation(keys, "hidden_act", {"silu": "silu"}, "silu")
    return {**read_common(keys, head_dim_default=head_dim_default), **read_rope(keys)}


def write_llama_style(provider: GPTModelProvider) -> dict[str, Any]:
    """The inverse of `read_llama_style`."""
    return {**write_common(provider), "hidden_act": "silu",
            "rope_parameters": rope_parameters(provider.rotary_base, provider.rope_scaling)}


def llama_style_rows(*, qkv_bias: bool, proj_bias: bool, mlp_bias: bool,
                     qk_layernorm: bool = False) -> tuple[NameMapping, ...]:
    """Our tensor names against a Llama-style checkpoint's: `post_attention_layernorm` is the norm before
    the MLP, biases only where asked, and with `qk_layernorm` the per-head `q_norm` / `k_norm`."""
    qk_norms = (
        layer_row("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
        layer_row("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
    ) if qk_layernorm else ()
    return (
        EMBEDDING_ROW,
        layer_row("input_layernorm.weight", "input_layernorm.weight"),
        *attention_rows(qkv_bias=qkv_bias, proj_bias=proj_bias),
        *qk_norms,
        layer_row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        *mlp_rows(bias=mlp_bias),
        FINAL_NORM_ROW,
        OUTPUT_ROW,
    )


def no_family_error(provider: GPTModelProvider, families: tuple[ModelFamily, ...]) -> ConversionError:
    """The error for a provider whose class belongs to none of `families`."""
    listed = "; ".join(family.describe() for family in families)
    return ConversionError(
        f"{type(provider).__name__} belongs to no model family the bridge converts, so it has no Hugging Face "
        f"config.json; use a provider of one of the families: {listed}"
    )
