"""`DoRA`: weight-decomposed low-rank adaptation (upstream's `megatron.bridge.peft.dora.DoRA`).

Each targeted output row keeps a learned magnitude `m` and a direction `W + s B A` (Liu et al., 2024):
`y = m / ||W + s B A|| * (W + s B A) x + b`, the row norms treated as constants in the backward pass
(as upstream and Hugging Face's peft do). `m` starts at the row norms of the base weight, so the
adapted model starts equal to the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.bridge.peft.base import PEFT
from megatron.bridge.peft.layers import AdaptedLinear, DoRALinear
from megatron.bridge.utils.errors import config_error

__all__ = ["DoRA"]


@dataclass
class DoRA(PEFT):
    """DoRA with upstream's fields and defaults: those of `LoRA`, but `alpha=64`, and dropout only "pre"."""

    alpha: float = 64
    """Scale numerator: the direction is `W + alpha / dim * B @ A` (upstream's DoRA default is 64)."""

    layer_class: ClassVar[type[AdaptedLinear]] = DoRALinear
    has_magnitude: ClassVar[bool] = True

    def validate(self) -> None:
        """`LoRA`'s checks, and dropout before the adapter only (as upstream)."""
        super().validate()
        if self.dropout_position != "pre":
            raise config_error("peft.dropout_position", self.dropout_position, "'pre' (DoRA supports only 'pre')")
