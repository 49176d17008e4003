"""The error a conversion raises for a folder or checkpoint it cannot use."""

from __future__ import annotations

from megatron.bridge.utils.errors import UserError

__all__ = ["ConversionError"]


class ConversionError(UserError):
    """A Hugging Face folder or training checkpoint the bridge cannot use: a missing or malformed file, a
    file name leading out of its folder, or tensors that do not fit the config; the message names the file."""
