"""Parameter-efficient finetuning: LoRA and DoRA adapters on the decoder's projections.

    from megatron.bridge.peft import LoRA
    model = LoRA(dim=16)(model)            # freeze the base, add adapters (before DDP / FSDP2 / compile)

`state` saves, loads and merges adapters; `flops` counts what a LoRA step computes. Hugging Face PEFT
folders are written and read by the bridge (`megatron.bridge.models.conversion.peft_adapter`,
`AutoBridge.save_hf_adapter`). See docs/peft.md.
"""

from megatron.bridge.peft.base import PEFT, freeze_summary, peft_from_dict
from megatron.bridge.peft.dora import DoRA
from megatron.bridge.peft.flops import lora_flops_per_token
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.peft.state import (
    adapter_state_dict,
    base_parameters,
    has_adapters,
    is_adapter_param,
    load_adapter_state_dict,
    merge,
    merged_state_dict,
    merged_tensor,
    merged_weights,
)
from megatron.bridge.peft.targets import TARGET_KINDS

__all__ = [
    "PEFT",
    "TARGET_KINDS",
    "DoRA",
    "LoRA",
    "adapter_state_dict",
    "base_parameters",
    "freeze_summary",
    "has_adapters",
    "is_adapter_param",
    "load_adapter_state_dict",
    "lora_flops_per_token",
    "merge",
    "merged_state_dict",
    "merged_tensor",
    "merged_weights",
    "peft_from_dict",
]
