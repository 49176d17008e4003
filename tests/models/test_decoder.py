"""Behaviour of the pure-PyTorch GPT decoder on tiny shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.bridge.models import GPTModel, GPTModelProvider
from megatron.bridge.models.decoder import Attention, rotary_cos_sin

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
