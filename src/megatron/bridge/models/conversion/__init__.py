"""Hugging Face conversion: `AutoBridge` and the shared machinery the families are built on (docs/bridge.md).

`AutoBridge` is imported on first use (PEP 562), so the family modules can import the readers and
the name-mapping machinery here without loading the bridge itself.
"""

from typing import Any

__all__ = ["AutoBridge"]


def __getattr__(name: str) -> Any:
    """Import `AutoBridge` lazily."""
    if name == "AutoBridge":
        from megatron.bridge.models.conversion.auto_bridge import AutoBridge

        return AutoBridge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
