"""Training FLOPs per token of a step with frozen base weights (LoRA, DoRA), for TFLOP/s and MFU.

Same convention as `training.metrics.model_flops_per_token` (2 FLOPs per multiply-add, every parameter
but the input lookup counted, causal attention `2 * seq * width` per layer and token in the forward
pass), but each part of the network is charged for what the step computes:

- forward: `2 * P` for every parameter, `2 * seq * width` per attention core;
- activation gradients (`2 * P`, attention `4 * seq * width`) only above the lowest trainable parameter:
  below it no gradient is needed, and its own input gradient neither;
- weight gradients (`2 * P`) only for trainable base parameters: none when the base is frozen;
- adapters: `6 * P`, forward and backward in full, wherever they sit.

With every parameter trainable this equals `model_flops_per_token`. The network is walked in forward
order: per block the q/k/v projections (with the input norm), the attention core, the output
projection, the first MLP layer(s) (with the pre-MLP norm), the last; then the final norm and the
output layer. Each adapter belongs to the projection it adapts. DoRA's row norms, computed once per
micro-batch rather than per token, are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from megatron.bridge.peft.state import is_adapter_param, unwrap

__all__ = ["lora_flops_per_token"]

# Which stage of a block each of its modules belongs to (the module right under the block, its
# self_attention or its mlp). Stage 1 is the attention core, which has no parameters.
_STAGE_OF_MODULE = {
    "input_layernorm": 0, "linear_q": 0, "linear_k": 0, "linear_v": 0, "q_layernorm": 0, "k_layernorm": 0,
    "linear_qkv_adapter": 0,
    "linear_proj": 2, "linear_proj_adapter": 2, "post_self_attn_layernorm": 2,
    "pre_mlp_layernorm": 3, "linear_gate": 3, "linear_up": 3, "linear_fc1": 3, "linear_fc1_adapter": 3,
    "linear_down": 4, "linear_fc2": 4, "linear_fc2_adapter": 4, "post_mlp_layernorm": 4,
}
_STAGES_PER_BLOCK = 5
_ATTENTION_CORE = 1


@dataclass
class _Stage:
    base: int = 0
    """Base-model parameters multiplied in the forward pass."""
    base_trainable: int = 0
    """Of which trainable (they also get weight gradients)."""
    adapter: int = 0
    """Adapter parameters (forward and backward in full: 6 FLOPs each)."""
    attention: bool = False
    """The attention core (its FLOPs come from the sequence length, not from parameters)."""

    def add(self, name: str, param: nn.Parameter) -> None:
        if is_adapter_param(name):
            self.adapter += param.numel()
        else:
            self.base += param.numel()
            self.base_trainable += param.numel() if param.requires_grad else 0


def _stages(model: nn.Module) -> tuple[list[_Stage], bool]:
    """The network's stages in forward order, and whether the input embedding is trainable."""
    stages = []
    for block in model.layers:
        block_stages = [_Stage(attention=index == _ATTENTION_CORE) for index in range(_STAGES_PER_BLOCK)]
        for name, param in block.named_parameters():
            key = name.removeprefix("self_attention.").removeprefix("mlp.").split(".")[0]
            assert key in _STAGE_OF_MODULE, f"lora_flops_per_token does not know block module {name!r}"
            block_stages[_STAGE_OF_MODULE[key]].add(name, param)
        stages += block_stages
    head = _Stage()
    for name, param in model.final_norm.named_parameters():
        head.add(name, param)
    head.add("output_layer.weight", model.embedding.weight if model.output_layer is None else model.output_layer.weight)
    return [*stages, head], model.embedding.weight.requires_grad


def lora_flops_per_token(model: nn.Module, *, num_layers: int, seq_length: int, attention_width: int) -> float:
    """Training FLOPs per token of `model` as it is frozen now (see the module docstring).

    Takes the keywords of `model_flops_per_token`, so the two are interchangeable; `model` may be
    wrapped by DDP or `torch.compile`.
    """
    stages, embedding_trainable = _stages(unwrap(model))
    assert len(stages) == num_layers * _STAGES_PER_BLOCK + 1, "num_layers does not match the model"
    trainable_at = [index for index, stage in enumerate(stages) if stage.base_trainable or stage.adapter]
    lowest = -1 if embedding_trainable else (trainable_at[0] if trainable_at else len(stages))
    attention_forward = 2.0 * seq_length * attention_width
    total = 0.0
    for index, stage in enumerate(stages):
        backward = index > lowest  # this stage's input gradient is needed
        if stage.attention:
            total += attention_forward * (3.0 if backward else 1.0)
        else:
            total += 2.0 * stage.base * (2.0 if backward else 1.0) + 2.0 * stage.base_trainable + 6.0 * stage.adapter
    return total
