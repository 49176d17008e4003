"""Which layers a config adapts (upstream's names and wildcards), and the fields it refuses."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import tiny_model, tiny_provider

from megatron.bridge.peft import DoRA, LoRA, peft_from_dict
from megatron.bridge.peft.layers import AdaptedLinear
from megatron.bridge.utils.errors import ConfigError


def adapted(model) -> set[str]:
    """Our names of the adapted layers."""
    return {name for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}


def adapters(model) -> set[str]:
    return {name for name, module in model.named_modules() if name.endswith("_adapter")}


def test_default_targets_cover_every_projection_with_base_names_unchanged():
    base_keys = set(tiny_model().state_dict())
    model = tiny_model(LoRA())
    assert adapted(model) == {f"layers.{n}.{m}" for n in range(2) for m in (
        "self_attention.linear_q", "self_attention.linear_k", "self_attention.linear_v", "self_attention.linear_proj",
        "mlp.linear_gate", "mlp.linear_up", "mlp.linear_down")}
    assert adapters(model) == {f"layers.{n}.{m}_adapter" for n in range(2) for m in (
        "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    assert base_keys < set(model.state_dict())
    qkv = model.layers[0].self_attention.linear_qkv_adapter
    assert qkv.linear_in.weight.shape == (32, 64) and qkv.linear_out.weight.shape == (64 + 32 + 32, 32)
    assert model.layers[1].mlp.linear_fc1_adapter.linear_out.weight.shape == (2 * 128, 32)


@pytest.mark.parametrize("targets, expected", [
    (["linear_qkv"], {"layers.0.self_attention.linear_qkv_adapter", "layers.1.self_attention.linear_qkv_adapter"}),
    (["*.layers.1.*.linear_qkv"], {"layers.1.self_attention.linear_qkv_adapter"}),
    (["*.layers.0.*"], {"layers.0.self_attention.linear_qkv_adapter", "layers.0.self_attention.linear_proj_adapter",
                        "layers.0.mlp.linear_fc1_adapter", "layers.0.mlp.linear_fc2_adapter"}),
    (["decoder.layers.1.mlp.linear_fc2", "layers.0.mlp.linear_fc1"],
     {"layers.1.mlp.linear_fc2_adapter", "layers.0.mlp.linear_fc1_adapter"}),
    (["*linear_proj"], {"layers.0.self_attention.linear_proj_adapter", "layers.1.self_attention.linear_proj_adapter"}),
], ids=["kind", "upstream-layer-pattern", "whole-layer", "exact-names", "suffix"])
def test_matching_rules(targets, expected):
    assert adapters(tiny_model(LoRA(target_modules=targets))) == expected


def test_exclude_modules_with_empty_targets():
    model = tiny_model(LoRA(target_modules=[], exclude_modules=["linear_fc2", "*.layers.0.*"]))
    assert adapters(model) == {"layers.1.self_attention.linear_qkv_adapter",
                               "layers.1.self_attention.linear_proj_adapter", "layers.1.mlp.linear_fc1_adapter"}


def test_plain_mlp_targets_its_own_fc1_and_fc2(ids):
    model = tiny_model(LoRA(target_modules=["linear_fc1", "linear_fc2"], lora_B_init_method="zero"),
                       gated_linear_unit=False)
    assert adapted(model) == {f"layers.{n}.mlp.linear_fc{k}" for n in range(2) for k in (1, 2)}
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tiny_model(gated_linear_unit=False)(ids), atol=0, rtol=0)


def test_an_entry_that_matches_nothing_is_refused_before_anything_changes():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"peft.target_modules=.*no module matched 'linear_q', "
                                          r"'\*.layers.2.\*'.*q/k/v are adapted together as linear_qkv.*layers 0..1"):
        LoRA(target_modules=["linear_qkv", "linear_q", "*.layers.2.*"])(model)
    assert not adapters(model) and all(p.requires_grad for p in model.parameters())
    # The same check needs only the provider, so a config can be checked before any model exists.
    with pytest.raises(ConfigError, match="no module matched 'linear_fc3'"):
        LoRA(target_modules=["linear_fc3"]).sites(tiny_provider())
    assert len(LoRA().sites(tiny_provider(num_layers=3))) == 12


@pytest.mark.parametrize("cls, fields, message", [
    (LoRA, dict(dim=0), "peft.dim=0 is invalid: a positive integer"),
    (LoRA, dict(dim=8.0), "peft.dim=8.0 is invalid"),
    (LoRA, dict(alpha=0), "peft.alpha=0 is invalid: a positive number"),
    (LoRA, dict(dropout=1.0), r"peft.dropout=1.0 is invalid: a probability in \[0, 1\)"),
    (LoRA, dict(dropout_position="mid"), "peft.dropout_position='mid' is invalid: one of 'pre', 'post'"),
    (LoRA, dict(lora_A_init_method="uniform"),
     "peft.lora_A_init_method='uniform' is invalid: one of xavier, kaiming, normal, zero"),
    (LoRA, dict(lora_B_init_method=None), "peft.lora_B_init_method=None is invalid"),
    (LoRA, dict(target_modules="linear_qkv"), "peft.target_modules='linear_qkv' is invalid: a list of module names"),
    (LoRA, dict(exclude_modules=["linear_fc2"]), "peft.exclude_modules=.* empty unless peft.target_modules is empty"),
    (DoRA, dict(dropout_position="post"), r"peft.dropout_position='post' is invalid: 'pre' \(DoRA supports only"),
])
def test_invalid_fields_are_refused(cls, fields, message):
    with pytest.raises(ConfigError, match=message):
        cls(**fields)


def test_fields_changed_after_construction_are_checked_again():
    lora = LoRA()
    lora.dim = -1
    with pytest.raises(ConfigError, match="peft.dim=-1"):
        lora(tiny_model())
    with pytest.raises(TypeError, match="dimm"):
        LoRA(dimm=8)


def test_defaults_and_the_run_config_round_trip():
    lora = LoRA()
    assert (lora.target_modules, lora.dim, lora.alpha, lora.dropout, lora.dropout_position,
            lora.lora_A_init_method, lora.lora_B_init_method) == (
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], 32, 32, 0.0, "pre", "xavier", "zero")
    for config in (LoRA(dim=8, target_modules=["*.layers.0.*"]), DoRA(alpha=16, dropout=0.1)):
        section = config.to_dict()
        assert section["_target_"] == f"megatron.bridge.peft.{type(config).__name__.lower()}.{type(config).__name__}"
        assert peft_from_dict(section) == config
    with pytest.raises(ConfigError, match=r"unknown field peft.rank; valid fields of peft: alpha, dim"):
        peft_from_dict({"_target_": "megatron.bridge.peft.lora.LoRA", "rank": 8})
    with pytest.raises(ConfigError, match=r"peft._target_='x.IA3' is invalid"):
        peft_from_dict({"_target_": "x.IA3"})
