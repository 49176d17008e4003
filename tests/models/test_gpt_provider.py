"""`GPTModelProvider` validation, derived sizes and the Qwen2.5 presets."""

from __future__ import annotations

import pytest
import torch

from megatron.bridge.models import (
    GPTModel,
    GPTModelProvider,
    Qwen2ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider500M,
)


def tiny(**overrides) -> GPTModelProvider:
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=50)
    fields.update(overrides)
    return GPTModelProvider(**fields)


def test_defaults_validate_and_derive_sizes():
    provider = tiny()
    provider.validate()
    assert provider.resolved_ffn_hidden_size == 128
    assert provider.resolved_num_query_groups == 4
    assert provider.resolved_kv_channels == 8
    # Derived sizes follow later edits, as recipes are shrunk by assigning fields.
    provider.hidden_size = 64
    assert provider.resolved_ffn_hidden_size == 256 and provider.resolved_kv_channels == 16


@pytest.mark.parametrize(
    ("vocab", "multiple", "padded"), [(50, 128, 128), (128, 128, 128), (129, 128, 256), (151936, 128, 151936)]
)
def test_padded_vocab_size(vocab, multiple, padded):
    assert tiny(vocab_size=vocab, make_vocab_size_divisible_by=multiple).padded_vocab_size == padded


def test_missing_vocab_size_is_a_clear_error():
    provider = tiny(vocab_size=None)
    provider.validate()  # allowed until the trainer fills it from the tokenizer
    with pytest.raises(ValueError, match="model.vocab_size"):
        provider.provide()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_layers", 0),
        ("hidden_size", -1),
        ("num_attention_heads", 0),
        ("seq_length", 0),
        ("ffn_hidden_size", 0),
        ("num_query_groups", 0),
        ("num_query_groups", 3),
        ("kv_channels", -8),
        ("kv_channels", 7),
        ("vocab_size", 0),
        ("make_vocab_size_divisible_by", 0),
        ("normalization", "BatchNorm"),
        ("position_embedding_type", "learned_absolute"),
        ("hidden_dropout", 1.0),
        ("attention_dropout", -0.1),
        ("init_method_std", 0.0),
        ("tensor_model_parallel_size", 2),
        ("pipeline_model_parallel_size", 2),
        ("context_parallel_size", 2),
        ("recompute_granularity", "selective"),
        ("rotary_base", 0),
        ("layernorm_epsilon", 0.0),
    ],
)
def test_validate_rejects(field, value):
    with pytest.raises(ValueError, match=f"model.{field}="):
        tiny(**{field: value}).validate()


@pytest.mark.parametrize(
    ("field", "value", "extra"),
    [
        ("activation_func", "relu", {}),
        ("qk_layernorm", 1, {}),
        ("layernorm_zero_centered_gamma", "yes", {}),
        ("post_self_attn_layernorm", None, {}),
        ("post_mlp_layernorm", 0, {}),
        ("scale_embeddings_by_hidden_size", 1.0, {}),
        ("softmax_scale", 0.0, {}),
        ("softmax_scale", -0.125, {}),
        ("softmax_scale", True, {}),
        ("window_size", (7, 1), {}),
        ("window_size", (-1, 0), {}),
        ("window_size", 8, {}),
        ("window_size", (7,), {}),
        ("window_size", (7.0, 0), {}),
        ("window_attn_skip_freq", 6, {}),  # without window_size
        ("window_attn_skip_freq", 0, {"window_size": (7, 0)}),
        ("window_attn_skip_freq", [1, 0, 1], {"window_size": (7, 0)}),  # two layers, three entries
        ("window_attn_skip_freq", [1, 2], {"window_size": (7, 0)}),
        ("window_attn_skip_freq", "6", {"window_size": (7, 0)}),
        ("rotary_base_local", 10000, {}),  # without window_size
        ("rotary_base_local", 0, {"window_size": (7, 0)}),
        ("attention_dropout", 0.1, {"window_size": (7, 0)}),
        ("rope_scaling", {"rope_type": "linear", "factor": 0}, {}),
        ("rope_scaling", {"rope_type": "linear"}, {}),
    ],
)
def test_validate_rejects_new_fields(field, value, extra):
    expected = r"model\.rope_scaling\['factor'\]=" if field == "rope_scaling" else rf"model\.{field}="
    with pytest.raises(ValueError, match=expected):
        tiny(**{field: value, **extra}).validate()


def test_validate_accepts_the_new_families_settings():
    gemma_like = tiny(
        kv_channels=16, qk_layernorm=True, layernorm_zero_centered_gamma=True, post_self_attn_layernorm=True,
        post_mlp_layernorm=True, activation_func="gelu_tanh", softmax_scale=0.0625,
        scale_embeddings_by_hidden_size=True, window_size=(511, 0), window_attn_skip_freq=6,
        rotary_base_local=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    gemma_like.validate()
    tiny(window_size=[4095, 0], window_attn_skip_freq=[1, 0]).validate()  # as read back from run_config.yaml


def test_validate_rejects_heads_not_dividing_hidden():
    with pytest.raises(ValueError, match="model.hidden_size="):
        tiny(hidden_size=30).validate()
    tiny(hidden_size=30, kv_channels=8).validate()  # an explicit head dim lifts the constraint


def test_validate_rejects_odd_derived_head_dim():
    with pytest.raises(ValueError, match="model.kv_channels="):
        tiny(hidden_size=36, num_attention_heads=4).validate()


def test_parallel_sizes_point_to_data_parallelism():
    with pytest.raises(ValueError, match="torchrun"):
        tiny(tensor_model_parallel_size=2).validate()


def test_provide_is_float32_cpu_and_seeded():
    provider = tiny()
    torch.manual_seed(7)
    a = provider.provide()
    torch.manual_seed(7)
    b = provider.provide()
    assert isinstance(a, GPTModel)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.dtype == torch.float32 and pa.device.type == "cpu", name
        assert torch.equal(pa, pb), name


def test_provide_needs_pre_and_post_process():
    with pytest.raises(ValueError, match="pipeline"):
        tiny().provide(pre_process=False)


def test_qwen2_defaults():
    provider = Qwen2ModelProvider()
    assert provider.add_qkv_bias and not provider.add_bias_linear and provider.gated_linear_unit
    assert provider.normalization == "RMSNorm" and provider.layernorm_epsilon == 1e-6
    assert provider.rotary_base == 1_000_000 and provider.vocab_size == 151936 and provider.seq_length == 4096


@pytest.mark.parametrize(
    ("cls", "expected", "tied"),
    [
        # Published parameter counts of the Hugging Face checkpoints.
        (Qwen25ModelProvider500M, 494_032_768, True),
        (Qwen25ModelProvider1P5B, 1_543_714_304, True),
        (Qwen25ModelProvider7B, 7_615_616_512, False),
    ],
)
def test_qwen25_parameter_counts(cls, expected, tied):
    provider = cls()
    provider.validate()
    with torch.device("meta"):
        model = provider.provide()
    assert model.num_parameters() == expected
    assert (model.output_layer is None) == tied
    assert model.layers[0].self_attention.linear_k.bias is not None


def _expected_parameters(p: GPTModelProvider) -> int:
    """The parameter count the provider's fields imply, written out independently of the model code."""
    h, d, ffn = p.hidden_size, p.resolved_kv_channels, p.resolved_ffn_hidden_size
    q, kv = p.num_attention_heads * d, p.resolved_num_query_groups * d
    norm = h * (2 if p.normalization == "LayerNorm" else 1)
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv) * p.add_qkv_bias + h * p.add_bias_linear
    attention += 2 * d * p.qk_layernorm * (2 if p.normalization == "LayerNorm" else 1)
    mlp = (3 if p.gated_linear_unit else 2) * h * ffn
    mlp += ((2 * ffn if p.gated_linear_unit else ffn) + h) * p.add_bias_linear
    norms_per_layer = 2 + p.post_self_attn_layernorm + p.post_mlp_layernorm
    vocab = p.padded_vocab_size * h
    untied = 0 if p.share_embeddings_and_output_weights else vocab
    return vocab + untied + p.num_layers * (attention + mlp + norms_per_layer * norm) + norm


def test_every_recipe_builds_on_the_meta_device():
    from megatron.bridge.cli import available_recipes

    recipes = available_recipes()
    assert len(recipes) == 15  # Qwen2.5 (4), Qwen3 (6), Llama 3.x (4), Gemma 3 (1)
    for name, recipe in recipes.items():
        provider = recipe().model
        if provider.vocab_size is None:  # as pretrain() does: the model follows the tokenizer
            provider.vocab_size = recipe().tokenizer.vocab_size
        with torch.device("meta"):
            model = provider.provide()
        assert all(p.device.type == "meta" for p in model.parameters()), name
        assert model.num_parameters() == _expected_parameters(provider), name


def test_every_decoder_part_builds_on_the_meta_device():
    provider = tiny(
        kv_channels=16, qk_layernorm=True, layernorm_zero_centered_gamma=True, post_self_attn_layernorm=True,
        post_mlp_layernorm=True, activation_func="gelu_tanh", softmax_scale=0.25,
        scale_embeddings_by_hidden_size=True, window_size=(3, 0), window_attn_skip_freq=2,
        rotary_base_local=10000.0, share_embeddings_and_output_weights=False, add_qkv_bias=True,
    )
    with torch.device("meta"):
        model = provider.provide()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_parameters() == _expected_parameters(provider)
    # Materialised on the CPU, the same model holds real, initialised weights.
    real = model.to_empty(device="cpu")
    real.reset_parameters()
    assert torch.all(real.final_norm.weight == 0) and real.layers[0].self_attention.linear_q.weight.std() > 0
