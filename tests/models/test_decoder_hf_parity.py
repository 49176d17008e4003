"""Our decoder reproduces `transformers`' Qwen3, Llama 3.2, Mistral and Gemma 3 (text) logits in float32.

Each test builds a tiny random model with `transformers`, copies its weights into a `GPTModel` whose
provider is set by hand to the same shape (the name map below is test-local), and compares the logits.
"""

from __future__ import annotations

import pytest
import torch

from megatron.bridge.models import GPTModel, GPTModelProvider

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 128, 24, 2
COMMON_HF = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
COMMON_OURS = dict(vocab_size=VOCAB, make_vocab_size_divisible_by=VOCAB, hidden_size=32, ffn_hidden_size=48,
                   num_attention_heads=4, num_query_groups=2, seq_length=SEQ)


def _our_name(hf_name: str, gemma: bool) -> str:
    """Hugging Face parameter name -> ours (HF's `post_attention_layernorm` is Gemma's post-attention norm
    but the others' pre-MLP norm)."""
    name = hf_name.removeprefix("model.")
    per_family = (
        {"post_attention_layernorm": "post_self_attn_layernorm", "pre_feedforward_layernorm": "pre_mlp_layernorm",
         "post_feedforward_layernorm": "post_mlp_layernorm"}
        if gemma else {"post_attention_layernorm": "pre_mlp_layernorm"}
    )
    renames = {
        "embed_tokens": "embedding", "lm_head": "output_layer", "self_attn.": "self_attention.",
        "q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "o_proj": "linear_proj",
        "q_norm": "q_layernorm", "k_norm": "k_layernorm", "gate_proj": "linear_gate", "up_proj": "linear_up",
        "down_proj": "linear_down", **per_family,
    }
    if name == "norm.weight":
        return "final_norm.weight"
    for theirs, ours in renames.items():
        name = name.replace(theirs, ours)
    return name


def _compare(hf_config, provider: GPTModelProvider, gemma: bool = False) -> tuple[GPTModel, torch.Tensor]:
    """Random HF model -> our model with the same weights; assert equal logits; return ours and the ids."""
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            # Large enough that attention is far from uniform; norm weights away from their init (0 or 1).
            param.copy_(torch.randn_like(param) * (0.3 if "norm" in name else 0.15) + ("norm" in name and not gemma))
    ours = provider.provide().eval()
    hf_state = {name: p for name, p in theirs.named_parameters()}
    mapped = {_our_name(name, gemma): p for name, p in hf_state.items()}
    assert mapped.keys() == dict(ours.named_parameters()).keys()
    ours.load_state_dict(mapped, strict=True)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    return ours, ids


def _differs_without_window(model: GPTModel, ids: torch.Tensor) -> bool:
    """The window changes the logits (so the comparison above could have caught a wrong window)."""
    with torch.no_grad():
        windowed = model(ids)
        model.windowed_layers = (False,) * len(model.layers)
        full = model(ids)
    return (windowed - full).abs().max().item() > 1e-3


def test_qwen3_qk_norm_and_head_dim_independent_of_hidden():
    hf = transformers.Qwen3Config(**COMMON_HF, num_hidden_layers=2, head_dim=16, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    ours = GPTModelProvider(**COMMON_OURS, num_layers=2, kv_channels=16, layernorm_epsilon=1e-6,
                            qk_layernorm=True, rotary_base=1_000_000)
    model, _ = _compare(hf, ours)
    assert model.layers[0].self_attention.q_layernorm.weight.shape == (16,)


def test_llama32_rope_scaling_tied():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = transformers.LlamaConfig(**COMMON_HF, num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                  rope_parameters={**scaling, "rope_theta": 500_000.0})
    ours = GPTModelProvider(**COMMON_OURS, num_layers=2, layernorm_epsilon=1e-5, rotary_base=500_000,
                            rope_scaling=scaling)
    _compare(hf, ours)


def test_mistral_window_shorter_than_the_sequence():
    hf = transformers.MistralConfig(**COMMON_HF, num_hidden_layers=2, sliding_window=8, rms_norm_eps=1e-6,
                                    tie_word_embeddings=False)
    ours = GPTModelProvider(**COMMON_OURS, num_layers=2, layernorm_epsilon=1e-6, window_size=(7, 0),
                            share_embeddings_and_output_weights=False)
    model, ids = _compare(hf, ours)
    assert model.windowed_layers == (True, True)
    assert _differs_without_window(model, ids)


def test_gemma3_local_and_global_layers():
    hf = transformers.Gemma3TextConfig(
        **COMMON_HF, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        sliding_window_pattern=3, rms_norm_eps=1e-6, pad_token_id=0,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    assert hf.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    ours = GPTModelProvider(
        **COMMON_OURS, num_layers=4, kv_channels=16, layernorm_epsilon=1e-6, qk_layernorm=True,
        layernorm_zero_centered_gamma=True, post_self_attn_layernorm=True, post_mlp_layernorm=True,
        activation_func="gelu_tanh", softmax_scale=24**-0.5, scale_embeddings_by_hidden_size=True,
        window_size=(7, 0), window_attn_skip_freq=3, rotary_base=1_000_000, rotary_base_local=10_000,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    model, ids = _compare(hf, ours, gemma=True)
    assert model.windowed_layers == (True, True, False, True)
    assert _differs_without_window(model, ids)
