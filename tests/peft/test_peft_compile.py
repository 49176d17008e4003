"""Adapted blocks under `torch.compile`: one graph per block, the eager model's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import tiny_model, token_batch

from megatron.bridge.peft import DoRA, LoRA, is_adapter_param


@pytest.mark.parametrize("peft", [LoRA(dim=4, lora_B_init_method="normal", dropout=0.1),
                                  DoRA(dim=4, lora_B_init_method="normal")], ids=["lora", "dora"])
def test_compiled_adapted_blocks_match_eager(peft):
    from torch._dynamo.utils import counters

    eager = tiny_model(peft, num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                       num_query_groups=1)
    compiled = copy.deepcopy(eager)
    eager.eval(), compiled.eval()  # dropout off: both see the same function
    # aot_eager runs Dynamo and AOTAutograd (what the adapters' structure meets) without Inductor's slow CPU
    # code generation; the trainer's default backend compiles the same graph further.
    for block in compiled.layers:
        block.compile(backend="aot_eager")
    counters.clear()
    tokens = token_batch(batch=2)
    losses = []
    for model in (eager, compiled):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss.detach())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    grads = {name: p.grad for name, p in compiled.named_parameters() if p.grad is not None}
    assert grads and all(is_adapter_param(name) for name in grads)
    for name, param in eager.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
