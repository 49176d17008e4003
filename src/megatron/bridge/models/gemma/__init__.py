"""The Gemma 3 text family (`Gemma3ForCausalLM`, `model_type: gemma3_text`).

The providers are importable from here; the Hugging Face side (config.json and tensor names) lives in
`gemma3_bridge`, loaded only by the conversion code. The multimodal Gemma 3 (`gemma3`) is not converted.
"""

from megatron.bridge.models.gemma.gemma3_provider import Gemma3ModelProvider, Gemma3ModelProvider1B

__all__ = ["Gemma3ModelProvider", "Gemma3ModelProvider1B"]
