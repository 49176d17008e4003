"""Our model, built from a Hugging Face folder, computes the same logits as `transformers` does."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import LLAMA3_SCALING, SEQ, token_ids

from megatron.bridge import AutoBridge
from megatron.bridge.models import GPTModel, GPTModelProvider, LlamaModelProvider, Qwen2ModelProvider
from megatron.bridge.models.decoder import llama3_scaled_frequencies, rotary_cos_sin


def our_and_hf_logits(folder, hf_model, vocab):
    model = AutoBridge.from_hf_pretrained(folder).to_megatron_model()[0].eval()
    ids = token_ids(vocab)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        # Megatron Core's convention: model(input_ids, position_ids, attention_mask); None means causal.
        ours = model(ids, position_ids, None)
        theirs = hf_model(ids).logits
    return model, ours, theirs


def test_qwen2_logits_match_transformers(qwen2_folder, qwen2_model):
    model, ours, theirs = our_and_hf_logits(qwen2_folder, qwen2_model, 250)
    assert ours.shape == theirs.shape == (2, SEQ, 250)  # vocab 250: not padded to a multiple of 128
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert model.output_layer is None  # tied
    assert model.layers[0].self_attention.linear_q.bias is not None


def test_llama_with_llama3_rope_scaling_matches_transformers(llama_folder, llama_model):
    model, ours, theirs = our_and_hf_logits(llama_folder, llama_model, 256)
    assert ours.shape == theirs.shape == (2, SEQ, 256)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The scaling is not a no-op at these sizes: without it the logits differ.
    model.config.rope_scaling = None
    with torch.no_grad():
        unscaled = model(token_ids(256))
    assert (unscaled - ours).abs().max() > 1e-3


def test_provider_fields_come_from_config_json(qwen2_folder, llama_folder):
    qwen = AutoBridge.from_hf_pretrained(qwen2_folder).to_megatron_provider(load_weights=False)
    assert type(qwen) is Qwen2ModelProvider
    assert (qwen.num_layers, qwen.hidden_size, qwen.ffn_hidden_size) == (2, 64, 96)
    assert (qwen.num_attention_heads, qwen.num_query_groups) == (4, 2)
    assert qwen.vocab_size == qwen.padded_vocab_size == 250
    assert qwen.share_embeddings_and_output_weights and qwen.add_qkv_bias and not qwen.add_bias_linear
    assert qwen.seq_length == 128 and qwen.rope_scaling is None and qwen.layernorm_epsilon == 1e-6
    llama = AutoBridge.from_hf_pretrained(llama_folder).to_megatron_provider(load_weights=False)
    assert type(llama) is LlamaModelProvider
    assert not llama.share_embeddings_and_output_weights and not llama.add_qkv_bias
    assert llama.kv_channels == 16 and llama.rotary_base == 10000
    assert llama.rope_scaling == LLAMA3_SCALING


def test_provider_without_weights_gives_the_architecture_only(qwen2_folder):
    provider = AutoBridge.from_hf_pretrained(qwen2_folder).to_megatron_provider(load_weights=False)
    assert provider.pre_wrap_hooks == ()
    torch.manual_seed(0)
    random_model = provider.provide()
    loaded = AutoBridge.from_hf_pretrained(qwen2_folder).to_megatron_provider().provide()
    assert not torch.equal(random_model.embedding.weight, loaded.embedding.weight)


def test_pre_wrap_hooks_run_in_order_and_may_replace_the_model():
    provider = GPTModelProvider(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32)
    seen = []
    replacement = GPTModel(provider)
    provider.register_pre_wrap_hook(lambda model: seen.append("first"))
    provider.register_pre_wrap_hook(lambda model: seen.append("second") or replacement)
    assert provider.provide() is replacement and seen == ["first", "second"]
    assert "hook" not in str(provider)  # not a config field


def test_to_megatron_model_device_and_dtype(qwen2_folder):
    chunks = AutoBridge.from_hf_pretrained(qwen2_folder).to_megatron_model(device="cpu")
    assert isinstance(chunks, list) and len(chunks) == 1
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in chunks[0].parameters())


def test_llama3_frequencies_keep_short_divide_long_and_blend_between():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    scaled = llama3_scaled_frequencies(inv_freq, LLAMA3_SCALING)
    wavelength = 2 * torch.pi / inv_freq
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    torch.testing.assert_close(scaled[short], inv_freq[short])
    torch.testing.assert_close(scaled[long], inv_freq[long] / 8)
    middle = ~short & ~long
    assert ((scaled[middle] < inv_freq[middle]) & (scaled[middle] > inv_freq[middle] / 8)).all()


def test_default_rope_path_is_unchanged_without_scaling():
    positions = torch.arange(10).unsqueeze(0)
    assert all(torch.equal(a, b) for a, b in zip(rotary_cos_sin(positions, 16, 10000),
                                                  rotary_cos_sin(positions, 16, 10000, None), strict=True))


@pytest.mark.parametrize(("scaling", "field"), [
    ({"rope_type": "yarn", "factor": 4.0}, "model.rope_scaling"),
    ({**LLAMA3_SCALING, "factor": 0}, "model.rope_scaling['factor']"),
    ({**LLAMA3_SCALING, "high_freq_factor": 0.5}, "model.rope_scaling['high_freq_factor']"),
])
def test_invalid_rope_scaling_is_rejected(scaling, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        LlamaModelProvider(num_layers=1, hidden_size=16, num_attention_heads=2, rope_scaling=scaling).validate()
