"""Behaviour of the pure-PyTorch GPT decoder on tiny shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.bridge.models import GPTModel, GPTModelProvider, LlamaModelProvider, Qwen2ModelProvider
from megatron.bridge.models.attention import AttentionMask, causal_band, sliding_window_block_mask
from megatron.bridge.models.decoder import MLP, Attention, RMSNorm, TransformerBlock, _rounded_to, rotary_cos_sin
from megatron.bridge.models.norms import LayerNorm

BATCH, SEQ, VOCAB = 2, 12, 100


def tiny(**overrides) -> GPTModelProvider:
    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=16,
    )
    fields.update(overrides)
    return GPTModelProvider(**fields)


def build(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return tiny(**overrides).provide().eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def test_logits_and_loss_shapes():
    model = build()
    ids = tokens()
    logits = model(ids)
    assert logits.shape == (BATCH, SEQ, 112)  # 100 padded up to a multiple of 16
    loss = model(ids, labels=tokens(2))
    assert loss.shape == (BATCH, SEQ) and loss.dtype == torch.float32


def test_loss_equals_cross_entropy_of_logits():
    model = build()
    ids, labels = tokens(), tokens(2)
    logits = model(ids)
    expected = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="none")
    torch.testing.assert_close(model(ids, labels=labels), expected.view(BATCH, SEQ))


def test_future_tokens_do_not_change_earlier_logits():
    model = build()
    ids = tokens()
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_explicit_causal_mask_matches_default():
    model = build()
    ids = tokens()
    # Megatron convention: True marks positions that must not be attended to.
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand(BATCH, 1, SEQ, SEQ)
    torch.testing.assert_close(model(ids, attention_mask=mask), model(ids), atol=1e-5, rtol=1e-5)


def test_padding_mask_hides_keys():
    model = build()
    ids = tokens()
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).repeat(BATCH, 1, 1, 1)
    mask[:, :, :, 0] = True  # nobody may look at token 0 ...
    mask[:, :, 0, 0] = False  # ... except token 0 itself, so no row is fully masked
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    a, b = model(ids, attention_mask=mask), model(changed, attention_mask=mask)
    torch.testing.assert_close(a[:, 1:], b[:, 1:])


def _reference_attention(attn: Attention, x: torch.Tensor, base: float) -> torch.Tensor:
    """Multi-head attention written out by hand: per-pair rotation, explicit repeated k/v, masked softmax."""
    b, s, _ = x.shape
    h, g, d = attn.num_heads, attn.num_groups, attn.head_dim
    q = attn.linear_q(x).view(b, s, h, d)
    k = attn.linear_k(x).view(b, s, g, d)
    v = attn.linear_v(x).view(b, s, g, d)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        # Rotate-half pairs dimension i with i + d/2, each pair turned by pos * base^(-2i/d).
        out = t.clone()
        for i in range(d // 2):
            theta = torch.arange(s, dtype=torch.float32) * base ** (-2 * i / d)
            cos, sin = theta.cos()[None, :, None], theta.sin()[None, :, None]
            x1, x2 = t[..., i], t[..., i + d // 2]
            out[..., i] = x1 * cos - x2 * sin
            out[..., i + d // 2] = x2 * cos + x1 * sin
        return out

    q, k = rotate(q), rotate(k)
    group_of_head = torch.arange(h) // (h // g)
    k, v = k[:, :, group_of_head], v[:, :, group_of_head]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, h * d)
    return attn.linear_proj(out)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_query_attention_matches_reference(groups):
    torch.manual_seed(0)
    config = tiny(num_query_groups=groups, add_qkv_bias=True, rotary_base=500)
    attn = Attention(config)
    x = torch.randn(BATCH, SEQ, config.hidden_size)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    rope = rotary_cos_sin(positions, attn.head_dim, config.rotary_base)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope), _reference_attention(attn, x, 500.0), atol=1e-5, rtol=1e-4)


def test_position_ids_are_honoured():
    model = build(init_method_std=0.3)  # large weights so attention is far from uniform
    ids = tokens()
    arange = torch.arange(SEQ).expand(BATCH, SEQ)
    torch.testing.assert_close(model(ids, position_ids=arange), model(ids))
    # A constant shift changes nothing (rotary attention sees only relative offsets); a stretch does.
    torch.testing.assert_close(model(ids, position_ids=arange + 5), model(ids), atol=1e-5, rtol=1e-4)
    stretched = arange * 3
    assert (model(ids, position_ids=stretched) - model(ids)).abs().max() > 1e-2
    # Each row uses its own positions.
    mixed = torch.stack([torch.arange(SEQ), torch.arange(SEQ) * 3])
    torch.testing.assert_close(model(ids, position_ids=mixed)[0], model(ids)[0])
    torch.testing.assert_close(model(ids, position_ids=mixed)[1], model(ids, position_ids=stretched)[1])


def test_tied_and_untied_embeddings():
    tied, untied = build(), build(share_embeddings_and_output_weights=False)
    assert tied.output_layer is None
    assert untied.output_layer is not None
    assert untied.output_layer.weight.data_ptr() != untied.embedding.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 112 * 32
    assert tied.num_parameters(exclude_embeddings=True) == untied.num_parameters(exclude_embeddings=True)
    # The tied model's logits come straight from the embedding matrix.
    ids = tokens()
    tied.embedding.weight.grad = None
    tied(ids).sum().backward()
    assert tied.embedding.weight.grad is not None


def test_qkv_bias_presence():
    with_bias = build(add_qkv_bias=True).layers[0].self_attention
    without = build(add_qkv_bias=False).layers[0].self_attention
    for name in ("linear_q", "linear_k", "linear_v"):
        assert getattr(with_bias, name).bias is not None
        assert getattr(without, name).bias is None
    assert with_bias.linear_proj.bias is None


def test_bias_linear_and_gelu_layernorm_variant():
    model = build(add_bias_linear=True, gated_linear_unit=False, normalization="LayerNorm")
    block = model.layers[0]
    assert isinstance(block.input_layernorm, torch.nn.LayerNorm)
    assert block.mlp.linear_fc1.bias is not None and block.self_attention.linear_proj.bias is not None
    assert not hasattr(block.mlp, "linear_gate")
    assert model(tokens()).shape == (BATCH, SEQ, 112)


def test_init_statistics():
    torch.manual_seed(0)
    config = tiny(hidden_size=128, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=512,
                  num_layers=8, share_embeddings_and_output_weights=False)
    model = config.provide()
    scaled = 0.02 / math.sqrt(2 * 8)
    block = model.layers[0]
    for weight, std in [
        (model.embedding.weight, 0.02), (model.output_layer.weight, 0.02),
        (block.self_attention.linear_q.weight, 0.02), (block.mlp.linear_up.weight, 0.02),
        (block.self_attention.linear_proj.weight, scaled), (block.mlp.linear_down.weight, scaled),
    ]:
        assert weight.std().item() == pytest.approx(std, rel=0.1)
        assert abs(weight.mean().item()) < std / 5
    assert torch.all(block.input_layernorm.weight == 1) and torch.all(model.final_norm.weight == 1)
    biased = build(add_qkv_bias=True).layers[0].self_attention.linear_q.bias
    assert torch.all(biased == 0)


def test_no_weight_decay_rule_is_ndim_below_two():
    model = build(add_qkv_bias=True, add_bias_linear=True, normalization="LayerNorm")
    for name, param in model.named_parameters():
        is_bias_or_norm = name.endswith(".bias") or "norm" in name
        assert (param.ndim < 2) == is_bias_or_norm, name
    assert model.embedding.weight.ndim == 2


def test_full_recompute_matches_plain_backward():
    ids, labels = tokens(), tokens(2)
    results = []
    for granularity in (None, "full"):
        model = build(recompute_granularity=granularity, hidden_dropout=0.1, attention_dropout=0.1).train()
        calls = []
        model.layers[0].mlp.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(123)  # identical dropout masks in both runs
        loss = model(ids, labels=labels).mean()
        loss.backward()
        assert len(calls) == (2 if granularity == "full" else 1)  # recompute reruns the block in backward
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_dropout_only_in_training():
    model = build(hidden_dropout=0.5, attention_dropout=0.5)
    ids = tokens()
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_bf16_autocast():
    model = build()
    ids, labels = tokens(), tokens(2)
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss = model(ids, labels=labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(logits.float(), reference, atol=5e-2, rtol=5e-2)


def test_bf16_weights_without_autocast():
    model = build().to(torch.bfloat16)
    logits = model(tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# --- Parameter names of today's families ------------------------------------------------------------


def test_qwen2_and_llama_parameter_names_and_counts_are_unchanged():
    shape = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                 vocab_size=100, make_vocab_size_divisible_by=16)
    layer = ["layers.0.input_layernorm.weight", "layers.0.self_attention.linear_q.weight",
             "layers.0.self_attention.linear_k.weight", "layers.0.self_attention.linear_v.weight",
             "layers.0.self_attention.linear_proj.weight", "layers.0.pre_mlp_layernorm.weight",
             "layers.0.mlp.linear_gate.weight", "layers.0.mlp.linear_up.weight", "layers.0.mlp.linear_down.weight"]
    qwen = Qwen2ModelProvider(**shape).provide()
    biases = ["layers.0.self_attention.linear_q.bias", "layers.0.self_attention.linear_k.bias",
              "layers.0.self_attention.linear_v.bias"]
    expected_qwen = ["embedding.weight", *layer[:2], biases[0], layer[2], biases[1], layer[3], biases[2],
                     *layer[4:], "final_norm.weight"]
    assert [name for name, _ in qwen.named_parameters()] == expected_qwen
    # embedding 112*32, q 32*32+32, k and v 32*16+16 each, proj 32*32, MLP 3*32*48, three norms of 32.
    assert qwen.num_parameters() == 3584 + 1056 + 2 * 528 + 1024 + 4608 + 96
    llama = LlamaModelProvider(**shape).provide()
    assert [name for name, _ in llama.named_parameters()] == ["embedding.weight", *layer, "final_norm.weight",
                                                               "output_layer.weight"]
    assert llama.num_parameters() == 3584 + 1024 + 2 * 512 + 1024 + 4608 + 96 + 3584


# --- The parts new families select -------------------------------------------------------------------


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_qk_layernorm_normalises_each_head_before_rope():
    torch.manual_seed(0)
    config = tiny(qk_layernorm=True, kv_channels=16, layernorm_epsilon=1e-6)  # head dim 16 != 32 / 4
    attn = Attention(config)
    assert attn.q_layernorm.weight.shape == (16,) and attn.k_layernorm.weight.shape == (16,)
    with torch.no_grad():
        attn.q_layernorm.weight.normal_(1.0, 0.5)
        attn.k_layernorm.weight.normal_(1.0, 0.5)
    x = torch.randn(BATCH, SEQ, config.hidden_size)
    cos, sin = rotary_cos_sin(torch.arange(SEQ).expand(BATCH, SEQ), 16, config.rotary_base)

    def reference(norm_first: bool) -> torch.Tensor:
        q = attn.linear_q(x).view(BATCH, SEQ, 4, 16).transpose(1, 2)
        k = attn.linear_k(x).view(BATCH, SEQ, 2, 16).transpose(1, 2)
        v = attn.linear_v(x).view(BATCH, SEQ, 2, 16).transpose(1, 2)
        rope = lambda t: t * cos + torch.cat((-t[..., 8:], t[..., :8]), -1) * sin  # noqa: E731
        norm_q = lambda t: _rms(t, 1e-6) * attn.q_layernorm.weight  # noqa: E731
        norm_k = lambda t: _rms(t, 1e-6) * attn.k_layernorm.weight  # noqa: E731
        q, k = (rope(norm_q(q)), rope(norm_k(k))) if norm_first else (norm_q(rope(q)), norm_k(rope(k)))
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
        return attn.linear_proj(out.transpose(1, 2).reshape(BATCH, SEQ, 64))

    with torch.no_grad():
        ours = attn(x, (cos, sin))
        torch.testing.assert_close(ours, reference(norm_first=True), atol=1e-5, rtol=1e-5)
        assert (ours - reference(norm_first=False)).abs().max() > 1e-3  # the order is observable
        # Per head: scaling one head's query projection leaves the output unchanged.
        attn.linear_q.weight[:16] *= 7.0
        torch.testing.assert_close(attn(x, (cos, sin)), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_class", [RMSNorm, LayerNorm])
def test_zero_centered_gamma_zero_weight_is_identity_gain(norm_class):
    x = torch.randn(3, 8)
    plain, centred = norm_class(8, 1e-6), norm_class(8, 1e-6, zero_centered_gamma=True)
    assert torch.all(centred.weight == 0)
    torch.testing.assert_close(centred(x), plain(x))
    with torch.no_grad():
        centred.weight.fill_(0.5)
    torch.testing.assert_close(centred(x), 1.5 * plain(x))


def test_zero_centered_gamma_applies_to_every_norm():
    model = build(layernorm_zero_centered_gamma=True, qk_layernorm=True, post_self_attn_layernorm=True,
                  post_mlp_layernorm=True)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 6 + 1  # input, q, k, post-attention, pre-MLP, post-MLP per layer, and the final
    assert all(m.zero_centered_gamma and torch.all(m.weight == 0) for m in norms)


def _perturbed_logits(model: GPTModel, position: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens()
    changed = ids.clone()
    changed[:, position] = (changed[:, position] + 1) % VOCAB
    with torch.no_grad():
        return model(ids, **kwargs), model(changed, **kwargs)


def test_window_of_w_keys_includes_the_query():
    # Hugging Face's sliding_window=4 is (3, 0): query i sees keys i-3 .. i, so token 4 reaches queries 4..7.
    model = build(num_layers=1, window_size=(3, 0), init_method_std=0.3)
    a, b = _perturbed_logits(model, position=4)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-4
    torch.testing.assert_close(a[:, 8:], b[:, 8:])
    torch.testing.assert_close(a[:, :4], b[:, :4])


def test_window_is_combined_with_an_explicit_mask():
    model = build(num_layers=1, window_size=(3, 0), init_method_std=0.3)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand(BATCH, 1, SEQ, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens(), attention_mask=causal), model(tokens()))
    # Two documents, 0..5 and 6..11 (reset_attention_mask): token 6 reaches 6..9 only (window), token 5 none
    # of the second document.
    documents = causal.clone()
    documents[:, :, 6:, :6] = True
    a, b = _perturbed_logits(model, position=6, attention_mask=documents)
    assert (a[:, 9] - b[:, 9]).abs().max() > 1e-4
    torch.testing.assert_close(a[:, 10:], b[:, 10:])
    a, b = _perturbed_logits(model, position=5, attention_mask=documents)
    torch.testing.assert_close(a[:, 6:], b[:, 6:])


def test_window_covering_the_sequence_is_full_causal():
    full, windowed = build(), build(window_size=(SEQ - 1, 0))
    with torch.no_grad():
        torch.testing.assert_close(windowed(tokens()), full(tokens()))
    masks = AttentionMask(seq_length=SEQ, device=torch.device("cpu"), block_sparse=True)
    assert masks.for_window(SEQ - 1) is None and masks.for_window(None) is None


def test_mask_kinds_per_device_and_window():
    cpu = torch.device("cpu")
    band = AttentionMask(seq_length=SEQ, device=cpu).for_window(3)
    assert band.dtype == torch.bool and torch.equal(band, causal_band(SEQ, 3, cpu))
    assert band[7].nonzero().flatten().tolist() == [4, 5, 6, 7]
    block = AttentionMask(seq_length=SEQ, device=cpu, block_sparse=True).for_window(3)
    assert not isinstance(block, torch.Tensor) and block.shape[-2:] == (SEQ, SEQ)
    assert block is AttentionMask(seq_length=SEQ, device=cpu, block_sparse=True).for_window(3)  # cached
    hidden = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    hidden[..., 0] = True
    combined = AttentionMask(seq_length=SEQ, device=cpu, hidden=hidden, block_sparse=True).for_window(3)
    assert isinstance(combined, torch.Tensor)  # an explicit mask is dense anyway: SDPA with both
    assert torch.equal(combined, ~hidden & causal_band(SEQ, 3, cpu))


# Eager FlexAttention warns that it is unfused; it is the mask, not the speed, under test here.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_matches_the_sdpa_band():
    """The GPU path's mask logic (FlexAttention forward runs on the CPU too, without autograd)."""
    seq, window_left = 160, 39  # one full 128-block and a partial one; the window crosses their border
    torch.manual_seed(0)
    config = tiny(seq_length=seq, softmax_scale=0.3)
    attn = Attention(config).eval()
    x = torch.randn(BATCH, seq, config.hidden_size)
    rope = rotary_cos_sin(torch.arange(seq).expand(BATCH, seq), attn.head_dim, config.rotary_base)
    cpu = torch.device("cpu")
    with torch.no_grad():
        dense = attn(x, rope, AttentionMask(seq_length=seq, device=cpu).for_window(window_left))
        flex = attn(x, rope, sliding_window_block_mask(seq, window_left, cpu))
        full = attn(x, rope, None)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert (dense - full).abs().max() > 1e-3


def test_window_attention_layers_pattern():
    assert tiny(num_layers=4).window_attention_layers == (False,) * 4
    assert tiny(num_layers=3, window_size=(7, 0)).window_attention_layers == (True,) * 3
    gemma = tiny(num_layers=26, window_size=(511, 0), window_attn_skip_freq=6).window_attention_layers
    assert [n for n, windowed in enumerate(gemma) if not windowed] == [5, 11, 17, 23]
    listed = tiny(num_layers=3, window_size=(7, 0), window_attn_skip_freq=[1, 0, 1]).window_attention_layers
    assert listed == (True, False, True)


def test_local_and_global_layers_get_their_rope_and_mask():
    model = build(num_layers=3, window_size=(3, 0), window_attn_skip_freq=3, rotary_base=1_000_000,
                  rotary_base_local=10_000, rope_scaling={"rope_type": "linear", "factor": 4.0})
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda _module, args: seen.append(args[1:]))
    with torch.no_grad():
        model(tokens())
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    local = rotary_cos_sin(positions, 8, 10_000)
    global_ = rotary_cos_sin(positions, 8, 1_000_000, {"rope_type": "linear", "factor": 4.0})
    (rope0, mask0), (rope1, mask1), (rope2, mask2) = seen
    assert rope0 is rope1 and mask0 is mask1  # built once per forward, shared by the windowed layers
    torch.testing.assert_close(rope0, local)
    torch.testing.assert_close(rope2, global_)
    assert torch.equal(mask0, causal_band(SEQ, 3, torch.device("cpu"))) and mask2 is None


def test_linear_rope_scaling_divides_the_frequencies():
    # Dividing every frequency by 4 turns position 4p into what position p was.
    scaled = rotary_cos_sin(torch.tensor([[0, 4, 8]]), 16, 10_000, {"rope_type": "linear", "factor": 4.0})
    for a, b in zip(scaled, rotary_cos_sin(torch.tensor([[0, 1, 2]]), 16, 10_000), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("activation", "gated", "expected"), [
    ("silu", True, lambda mlp, x: mlp.linear_down(F.silu(mlp.linear_gate(x)) * mlp.linear_up(x))),
    ("gelu_tanh", True,
     lambda mlp, x: mlp.linear_down(F.gelu(mlp.linear_gate(x), approximate="tanh") * mlp.linear_up(x))),
    ("gelu", False, lambda mlp, x: mlp.linear_fc2(F.gelu(mlp.linear_fc1(x)))),
])
def test_mlp_activations(activation, gated, expected):
    torch.manual_seed(0)
    mlp = MLP(tiny(activation_func=activation, gated_linear_unit=gated))
    x = torch.randn(BATCH, SEQ, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected(mlp, x))


def test_activation_default_keeps_each_mlp_form():
    assert tiny().resolved_activation_func == "silu"
    assert tiny(gated_linear_unit=False).resolved_activation_func == "gelu"
    torch.manual_seed(0)
    geglu, swiglu = MLP(tiny(activation_func="gelu_tanh")), MLP(tiny())
    swiglu.load_state_dict(geglu.state_dict())
    x = torch.randn(BATCH, SEQ, 32) * 3
    with torch.no_grad():
        assert (geglu(x) - swiglu(x)).abs().max() > 1e-3


def test_softmax_scale_multiplies_the_scores():
    torch.manual_seed(0)
    default, scaled = Attention(tiny()), Attention(tiny(softmax_scale=0.9))
    scaled.load_state_dict(default.state_dict())
    with torch.no_grad():  # the same scores as queries multiplied by 0.9 * sqrt(head_dim) at the default scale
        default.linear_q.weight *= 0.9 * math.sqrt(8)
    x = torch.randn(BATCH, SEQ, 32)
    rope = rotary_cos_sin(torch.arange(SEQ).expand(BATCH, SEQ), 8, 10000)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, rope), default(x, rope), atol=1e-5, rtol=1e-5)


def test_embedding_scale_and_unscaled_tied_output():
    model = build(scale_embeddings_by_hidden_size=True)
    ids = tokens()
    captured = {}
    model.layers[0].register_forward_pre_hook(lambda _m, args: captured.update(x=args[0]))
    model.final_norm.register_forward_hook(lambda _m, _args, out: captured.update(h=out))
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(captured["x"], model.embedding.weight[ids] * math.sqrt(32), rtol=0, atol=0)
    torch.testing.assert_close(logits, F.linear(captured["h"], model.embedding.weight))
    # In bf16 the scale itself is rounded first, as Hugging Face's Gemma does: sqrt(1152) = 33.94 -> 34.
    assert _rounded_to(math.sqrt(1152), torch.bfloat16) == 34.0


def test_post_attention_and_post_mlp_norms():
    torch.manual_seed(0)
    config = tiny(post_self_attn_layernorm=True, post_mlp_layernorm=True)
    block = TransformerBlock(config)
    names = [name for name, _ in block.named_parameters()]
    assert "post_self_attn_layernorm.weight" in names and "post_mlp_layernorm.weight" in names
    with torch.no_grad():
        for norm in (block.post_self_attn_layernorm, block.post_mlp_layernorm, block.pre_mlp_layernorm):
            norm.weight.normal_(1.0, 0.5)
    x = torch.randn(BATCH, SEQ, 32)
    rope = rotary_cos_sin(torch.arange(SEQ).expand(BATCH, SEQ), 8, 10000)
    with torch.no_grad():
        h = x + block.post_self_attn_layernorm(block.self_attention(block.input_layernorm(x), rope))
        expected = h + block.post_mlp_layernorm(block.mlp(block.pre_mlp_layernorm(h)))
        torch.testing.assert_close(block(x, rope), expected)
    plain = TransformerBlock(tiny())
    assert plain.post_self_attn_layernorm is None and plain.post_mlp_layernorm is None


def test_windowed_model_trains_on_the_cpu():
    model = build(window_size=(3, 0), window_attn_skip_freq=2, qk_layernorm=True).train()
    loss = model(tokens(), labels=tokens(2)).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_SEQ = 300  # two full 128-blocks and a partial one


def _gpu_windowed_model() -> GPTModel:
    return build(seq_length=GPU_SEQ, window_size=(63, 0), window_attn_skip_freq=2).train()


@needs_gpu
def test_gpu_flex_attention_trains_like_the_cpu_band():
    from torch.nn.attention.flex_attention import BlockMask

    cpu_model = _gpu_windowed_model()
    gpu_model = _gpu_windowed_model().cuda()
    ids = torch.randint(0, VOCAB, (BATCH, GPU_SEQ), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(GPU_SEQ, device="cuda").expand(BATCH, GPU_SEQ)
    masks = AttentionMask(seq_length=GPU_SEQ, device=positions.device, block_sparse=True)
    assert [type(mask) for _, mask in gpu_model._layer_inputs(positions, masks)] == [BlockMask, type(None)]
    losses = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        loss = model(ids.to(device), labels=ids.to(device)).mean()
        loss.backward()
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, cpu_param), gpu_param in zip(cpu_model.named_parameters(), gpu_model.parameters(), strict=True):
        torch.testing.assert_close(gpu_param.grad.cpu(), cpu_param.grad, atol=1e-5, rtol=1e-3, msg=name)


@needs_gpu
def test_gpu_compiled_windowed_blocks_under_bf16_autocast():
    eager, compiled = _gpu_windowed_model().cuda(), _gpu_windowed_model().cuda()
    for block in compiled.layers:  # as the trainer does with train.compile
        block.compile()
    ids = torch.randint(0, VOCAB, (BATCH, GPU_SEQ), device="cuda")
    losses = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=1e-2)
    assert all(torch.isfinite(p.grad).all() for p in compiled.parameters())
