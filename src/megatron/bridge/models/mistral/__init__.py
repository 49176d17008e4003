"""The Mistral family (`MistralForCausalLM`), with its sliding window.

The providers are importable from here; the Hugging Face side (config.json and tensor names) lives in
`mistral_bridge`, loaded only by the conversion code.
"""

from megatron.bridge.models.mistral.mistral_provider import MistralModelProvider, MistralModelProvider7B

__all__ = ["MistralModelProvider", "MistralModelProvider7B"]
