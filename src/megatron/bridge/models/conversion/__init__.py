"""Hugging Face conversion: `AutoBridge` and the name map it is built on (see docs/bridge.md)."""

from megatron.bridge.models.conversion.auto_bridge import AutoBridge
from megatron.bridge.models.conversion.param_mapping import PARAM_MAPPINGS, to_hf_name, to_megatron_name

__all__ = ["AutoBridge", "PARAM_MAPPINGS", "to_hf_name", "to_megatron_name"]
