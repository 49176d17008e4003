"""`LoRA`: low-rank adapters on the attention and MLP projections (upstream's `megatron.bridge.peft.lora.LoRA`).

    cfg.peft = LoRA(target_modules=["linear_qkv", "linear_proj"], dim=16, alpha=32)

Each targeted site gets `y = W x + alpha / dim * B A x` with W frozen; see `base.PEFT` for how it is
applied and `targets` for what the names cover in our model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.bridge.peft.base import PEFT
from megatron.bridge.peft.layers import AdaptedLinear, LoRALinear

__all__ = ["LoRA"]


@dataclass
class LoRA(PEFT):
    """Low-Rank Adaptation (Hu et al., 2021) with upstream's fields and defaults.

    Fields: `target_modules` (default `["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]`, with
    wildcards), `exclude_modules`, `dim=32`, `alpha=32`, `dropout=0.0`, `dropout_position="pre"`
    (or "post"), `lora_A_init_method="xavier"`, `lora_B_init_method="zero"` (each of xavier, kaiming,
    normal, zero).
    """

    layer_class: ClassVar[type[AdaptedLinear]] = LoRALinear
