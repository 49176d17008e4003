"""LoRA and DoRA on our decoder: what trains, what merges, what is saved, what a step costs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft_helpers import SEQ, tiny_model, tiny_provider, train_steps
from safetensors.torch import save_file
from torch import nn

from megatron.bridge.peft import (
    DoRA,
    LoRA,
    adapter_state_dict,
    base_parameters,
    freeze_summary,
    has_adapters,
    is_adapter_param,
    load_adapter_state_dict,
    lora_flops_per_token,
    merge,
    merged_state_dict,
    merged_tensor,
)
from megatron.bridge.peft.layers import LoRALinear
from megatron.bridge.training.metrics import model_flops_per_token
from megatron.bridge.utils.errors import UserError

ATTENTION = "layers.{}.self_attention.{}"
MLP = "layers.{}.mlp.{}"


@pytest.fixture(scope="module")
def trained():
    """A LoRA model after three real AdamW steps, the base it started from, and the optimizer."""
    model = tiny_model(LoRA(dim=8, alpha=16))
    base = {name: p.detach().clone() for name, p in base_parameters(model).items()}
    adapters_before = {name: t.clone() for name, t in adapter_state_dict(model).items()}
    optimizer = train_steps(model, 3)
    return model, base, adapters_before, optimizer


def test_training_changes_only_adapters_and_the_optimizer_holds_only_them(trained):
    model, base, adapters_before, optimizer = trained
    for name, param in base_parameters(model).items():
        assert torch.equal(param, base[name]), name
        assert not param.requires_grad and param.grad is None, name
    after = adapter_state_dict(model)
    assert after.keys() == adapters_before.keys() and len(after) == 2 * 4 * 2  # A and B, 4 sites, 2 layers
    assert all(not torch.equal(after[name], adapters_before[name]) for name in after)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for name, p in model.named_parameters() if is_adapter_param(name)}
    assert optimized == adapters


def test_merged_weights_are_base_plus_scaled_b_a_per_member_rows(trained):
    model, base, _, _ = trained
    merged, adapters, scale = merged_state_dict(model), adapter_state_dict(model), 16 / 8
    assert merged.keys() == base.keys()
    assert torch.equal(merged_tensor(model, "layers.1.mlp.linear_up.weight"), merged["layers.1.mlp.linear_up.weight"])
    with pytest.raises(UserError, match="is an adapter tensor"):
        merged_tensor(model, "layers.1.mlp.linear_fc1_adapter.linear_in.weight")

    def expect(kind: str, parent: str, members: list[str], layer: int) -> None:
        prefix = parent.format(layer, f"{kind}_adapter")
        a, b = adapters[f"{prefix}.linear_in.weight"], adapters[f"{prefix}.linear_out.weight"]
        start = 0
        for member in members:
            weight = base[parent.format(layer, member) + ".weight"]
            rows = slice(start, start + weight.shape[0])
            torch.testing.assert_close(merged[parent.format(layer, member) + ".weight"], weight + scale * b[rows] @ a,
                                       atol=1e-6, rtol=0)
            start += weight.shape[0]
        assert start == b.shape[0]

    for layer in range(2):
        expect("linear_qkv", ATTENTION, ["linear_q", "linear_k", "linear_v"], layer)
        expect("linear_proj", ATTENTION, ["linear_proj"], layer)
        expect("linear_fc1", MLP, ["linear_gate", "linear_up"], layer)
        expect("linear_fc2", MLP, ["linear_down"], layer)
    for name in ("embedding.weight", "layers.0.self_attention.linear_q.bias", "final_norm.weight"):
        assert torch.equal(merged[name], base[name])


def test_merged_model_computes_the_adapted_models_logits(trained, ids):
    model = trained[0]
    with torch.no_grad():
        adapted, plain = model(ids), tiny_model()(ids)
        merged = merge(copy.deepcopy(model))
        merged_logits = merged(ids)
    assert (adapted - plain).abs().max() > 1e-3  # the adapters do change the model
    torch.testing.assert_close(merged_logits, adapted, atol=1e-5, rtol=0)
    assert not any(is_adapter_param(name) for name, _ in merged.named_parameters())
    assert type(merged.layers[0].self_attention.linear_q) is nn.Linear
    assert merged.state_dict().keys() == tiny_model().state_dict().keys()


def test_dora_starts_as_the_base_and_merges_to_its_own_output(ids):
    model = tiny_model(DoRA(dim=4))
    assert DoRA().alpha == 64 and LoRA().alpha == 32
    adapter = model.layers[0].self_attention.linear_qkv_adapter
    w_qkv = torch.cat([model.layers[0].self_attention.get_submodule(m).weight for m in ("linear_q", "linear_k",
                                                                                          "linear_v")])
    torch.testing.assert_close(adapter.weight_magnitude.detach(), w_qkv.norm(dim=1), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tiny_model()(ids), atol=1e-5, rtol=0)
    train_steps(model, 2)
    with torch.no_grad():
        merged = merge(copy.deepcopy(model))(ids)
        adapted = model(ids)
    assert (adapted - tiny_model()(ids)).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("peft", [
    LoRA(dropout=0.5, dropout_position="pre", lora_B_init_method="normal"),
    LoRA(dropout=0.5, dropout_position="post", lora_B_init_method="normal"),
    DoRA(dropout=0.5, lora_B_init_method="normal"),
], ids=["lora-pre", "lora-post", "dora"])
def test_dropout_acts_in_training_only(peft, ids):
    model = tiny_model(peft)
    without = copy.deepcopy(model)
    for module in without.modules():
        if hasattr(module, "dropout_p"):
            module.dropout, module.dropout_p = nn.Identity(), 0.0
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), without.eval()(ids), atol=0, rtol=0)
        train_a, train_b = model.train()(ids), model(ids)
    assert (train_a - train_b).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["xavier", "kaiming", "normal", "zero"])
def test_init_methods(method):
    model = tiny_model(LoRA(dim=16, lora_A_init_method=method, lora_B_init_method=method), hidden_size=128,
                       ffn_hidden_size=256)
    a = model.layers[0].mlp.linear_fc2_adapter.linear_in.weight.detach()  # [16, 256]
    fan_out, fan_in = a.shape
    if method == "zero":
        assert not a.any()
    elif method == "kaiming":
        bound = 1 / math.sqrt(fan_in)
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    else:
        std = 0.2 if method == "normal" else math.sqrt(2 / (fan_in + fan_out))
        assert abs(a.std().item() / std - 1) < 0.1


def test_adapter_checkpoint_is_a_small_fraction_and_loads_strictly(tmp_path, ids):
    model = tiny_model(LoRA(dim=8, lora_B_init_method="normal"), hidden_size=256, ffn_hidden_size=512,
                       num_attention_heads=8, vocab_size=1024)
    save_file(adapter_state_dict(model), tmp_path / "adapters.safetensors")
    save_file({k: v.contiguous() for k, v in base_parameters(model).items()}, tmp_path / "model.safetensors")
    ratio = (tmp_path / "adapters.safetensors").stat().st_size / (tmp_path / "model.safetensors").stat().st_size
    assert ratio < 0.05, ratio

    fresh = tiny_model(LoRA(dim=8), seed=0, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8,
                       vocab_size=1024)
    state = adapter_state_dict(model)
    bad = dict(state)
    first = next(iter(bad))
    bad.pop(first)
    unexpected = "layers.0.mlp.linear_fc2_adapter.linear_in.bias"
    bad[unexpected] = torch.zeros(8)
    with pytest.raises(UserError, match=rf"missing: {first}.*unexpected: {unexpected}"):
        load_adapter_state_dict(fresh, bad)
    wrong_shape = {**state, first: torch.zeros(4, 256)}
    with pytest.raises(UserError, match=r"has shape \(4, 256\), the model's is \(8, 256\)"):
        load_adapter_state_dict(fresh, wrong_shape)
    assert not fresh.layers[0].self_attention.linear_qkv_adapter.linear_out.weight.any()  # untouched so far
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)


def test_is_adapter_param():
    for name in ("layers.0.self_attention.linear_qkv_adapter.linear_in.weight",
                 "module.layers.3.mlp.linear_fc2_adapter.weight_magnitude",
                 "model.layers.1.mlp.linear_fc1_adapter.linear_out.weight"):
        assert is_adapter_param(name), name
    for name in ("layers.0.self_attention.linear_q.weight", "embedding.weight", "linear_qkv_adapter"):
        assert not is_adapter_param(name), name


def test_apply_refuses_a_wrapped_or_already_adapted_model():
    model = tiny_model(LoRA())
    with pytest.raises(UserError, match="already has adapters"):
        LoRA()(model)
    with pytest.raises(UserError, match="before DDP / FSDP2"):
        LoRA()(torch.compile(tiny_model()))
    assert isinstance(model.layers[1].mlp.linear_down, LoRALinear)


def _stage_params(model, layer: int, names: list[str]) -> int:
    block = model.layers[layer]
    return sum(p.numel() for name, p in block.named_parameters() if name.rsplit(".", 1)[0] in names)


def test_flops_count_what_a_lora_step_computes():
    kw = dict(num_layers=2, seq_length=SEQ, attention_width=64)
    full = tiny_model()
    assert lora_flops_per_token(full, **kw) == model_flops_per_token(full, **kw)

    model = tiny_model(LoRA(dim=8))
    base = sum(p.numel() for p in base_parameters(model).values())  # the tied embedding counts once
    adapters = sum(p.numel() for name, p in model.named_parameters() if is_adapter_param(name))
    # The layer-0 q/k/v projections (and the input norm) need no input gradient: nothing below them trains.
    layer0_qkv = _stage_params(model, 0, ["input_layernorm", "self_attention.linear_q", "self_attention.linear_k",
                                          "self_attention.linear_v"])
    attention = 2 * SEQ * 64 * 2  # forward, per layer
    expected = 4 * base - 2 * layer0_qkv + 3 * attention + 6 * adapters
    assert lora_flops_per_token(model, **kw) == expected

    only_last = tiny_model(LoRA(dim=8, target_modules=["*.layers.1.*.linear_fc2"]))
    head = model.final_norm.weight.numel() + model.embedding.weight.numel()
    adapters = sum(p.numel() for name, p in only_last.named_parameters() if is_adapter_param(name))
    # Everything runs forward; only the head (final norm, tied output layer) back-propagates to the adapter.
    assert lora_flops_per_token(only_last, **kw) == 2 * base + 2 * head + attention + 6 * adapters


def test_adapted_model_is_built_by_the_provider_hook(ids):
    provider = tiny_provider()
    provider.register_pre_wrap_hook(LoRA(dim=4, lora_B_init_method="normal"))
    torch.manual_seed(0)
    model = provider.provide()
    assert isinstance(model.layers[0].self_attention.linear_q, LoRALinear)
    assert not model.embedding.weight.requires_grad
    assert has_adapters(model) and not has_adapters(tiny_model())
    adapters = sum(p.numel() for name, p in model.named_parameters() if is_adapter_param(name))
    total = sum(p.numel() for p in model.parameters())
    assert freeze_summary(model) == (f"> PEFT: {adapters / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters "
                                     f"({100 * adapters / total:.2f}%)")


def test_members_of_a_site_share_one_down_projection_with_exact_gradients_and_keep_no_activation():
    import gc
    import weakref

    model = tiny_model(LoRA(dim=8, alpha=16, lora_B_init_method="normal"))
    attention = model.layers[0].self_attention
    adapter = attention.linear_qkv_adapter
    members = [attention.linear_q, attention.linear_k, attention.linear_v]
    a = adapter.linear_in.weight.detach().clone().requires_grad_()
    b = adapter.linear_out.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 5, a.shape[1], requires_grad=True)
    weights = [torch.randn(2, 5, m.out_features) for m in members]
    # Reference: every member's y = W x + bias + s * (x A^T) B_i^T, written out with plain tensors.
    reference = sum(
        ((torch.nn.functional.linear(x, m.weight, m.bias) + adapter.scale * (x @ a.t()) @ b[m.rows[0]:m.rows[1]].t())
         * w).sum() for m, w in zip(members, weights, strict=True))
    reference.backward()
    expected = (x.grad.clone(), a.grad, b.grad)
    x.grad = None
    sum((m(x) * w).sum() for m, w in zip(members, weights, strict=True)).backward()
    actual = (x.grad, adapter.linear_in.weight.grad, adapter.linear_out.weight.grad)
    for mine, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # Once the last member has read it, the site holds neither the input nor its product.
    probe = torch.randn(2, 5, a.shape[1])
    alive = weakref.ref(probe)
    with torch.no_grad():
        outputs = [m(probe) for m in members]
    del probe, outputs
    gc.collect()
    assert alive() is None
