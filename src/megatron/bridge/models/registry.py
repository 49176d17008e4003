"""The model families the bridge converts, in one explicit list, and the lookups that go through it.

    FAMILIES = (QWEN2, QWEN3, LLAMA, MISTRAL, GEMMA3)

A config.json picks its family by `architectures` (or, when a file has none, by its own `model_type`);
a provider picks it by its class. Nothing is guessed from other fields. Adding a family means adding
its module under `models/` and one entry here (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.bridge.models.conversion.family import ModelFamily, no_family_error
from megatron.bridge.models.gemma.gemma3_bridge import GEMMA3
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.models.llama.llama_bridge import LLAMA
from megatron.bridge.models.mistral.mistral_bridge import MISTRAL
from megatron.bridge.models.qwen.qwen2_bridge import QWEN2
from megatron.bridge.models.qwen.qwen3_bridge import QWEN3
from megatron.bridge.utils.errors import ConfigError, short_repr

__all__ = [
    "FAMILIES",
    "family_of_config",
    "family_of_provider",
    "hf_config_from_provider",
    "hf_tensor_shapes",
    "provider_classes",
    "provider_from_hf_config",
    "supported_architectures",
]

FAMILIES: tuple[ModelFamily, ...] = (QWEN2, QWEN3, LLAMA, MISTRAL, GEMMA3)
"""Every family, in the order `AutoBridge.list_supported_models()` lists them."""


def supported_architectures() -> list[str]:
    """config.json `architectures` entries the bridge reads, family by family."""
    return [name for family in FAMILIES for name in family.architectures]


def family_of_config(config: dict[str, Any], source: str = "config.json") -> ModelFamily:
    """The family config.json's `architectures` names (the first one known wins); `ConfigError` naming the
    file, the architecture and the supported ones otherwise."""
    names = config.get("architectures")
    if isinstance(names, str):
        names = [names]
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{source}: architectures={short_repr(names)} is invalid: a list of class names, e.g. "
                          "[\"Qwen2ForCausalLM\"]")
    if not names:  # older configs name only the model type: the file's own declaration, still no guess
        model_type = config.get("model_type")
        for family in FAMILIES:
            if family.model_type == model_type:
                return family
        names = [f"model_type={short_repr(model_type)}"]
    for name in names:
        for family in FAMILIES:
            if name in family.architectures:
                return family
    listed = ", ".join(names)
    raise ConfigError(
        f"{source}: architecture {listed if len(listed) <= 200 else listed[:200] + '...'} is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )


def family_of_provider(provider: GPTModelProvider) -> ModelFamily:
    """The family whose provider class `provider` is an instance of (the most specific one when several
    are); `ConversionError` naming the families when none is."""
    mro = type(provider).__mro__
    matches = [(mro.index(family.provider_class), family) for family in FAMILIES if family.provider_class in mro]
    if not matches:
        raise no_family_error(provider, FAMILIES)
    return min(matches, key=lambda match: match[0])[1]


def provider_classes() -> dict[str, type[GPTModelProvider]]:
    """Every family's provider classes by the `_target_` names run_config.yaml may give them: the defining
    module's path and the family package's (`megatron.bridge.models.qwen.Qwen2ModelProvider`, the path
    checkpoints written before the packages were split still hold)."""
    classes: dict[str, type[GPTModelProvider]] = {}
    for family in FAMILIES:
        for cls in family.providers:
            package = cls.__module__.rpartition(".")[0]
            classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
            classes[f"{package}.{cls.__qualname__}"] = cls
    return classes


def provider_from_hf_config(config: dict[str, Any], source: str = "config.json") -> GPTModelProvider:
    """The provider (of its family's class) config.json describes, every key checked first."""
    return family_of_config(config, source).provider_from_hf_config(config, source)


def hf_config_from_provider(provider: GPTModelProvider, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json for a model of `provider` when no original config is at hand (its family by class)."""
    return family_of_provider(provider).hf_config_from_provider(provider, dtype)


def hf_tensor_shapes(provider: GPTModelProvider) -> dict[str, torch.Size]:
    """The Hugging Face tensor names and shapes a checkpoint of `provider` (its family by class) holds."""
    return family_of_provider(provider).hf_tensor_shapes(provider)
