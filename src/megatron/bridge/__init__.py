"""megatron-bridge-lite: Megatron Bridge's training API and callback system in pure PyTorch.

Importing the package is cheap: sub-packages (training, models, data, recipes) load on demand, and
`from megatron.bridge import AutoBridge` loads the Hugging Face conversion code only when asked for.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["AutoBridge", "__version__"]


def __getattr__(name: str) -> Any:
    """Import `AutoBridge` on first access (PEP 562), keeping `import megatron.bridge.training.callbacks` light."""
    if name == "AutoBridge":
        from megatron.bridge.models.conversion.auto_bridge import AutoBridge

        return AutoBridge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
