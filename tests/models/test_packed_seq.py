"""Packed sequences in the decoder: attention stays inside each example, positions restart, masks per device."""

from __future__ import annotations

import pytest
import torch

from megatron.bridge.models import GPTModelProvider, PackedSeqParams, get_packed_seq_params
from megatron.bridge.models.attention import (
    Attention,
    AttentionMask,
    DocumentSpans,
    rotary_cos_sin,
    same_document_causal,
)

VOCAB = 100
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build(**overrides):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                  seq_length=64, vocab_size=VOCAB, make_vocab_size_divisible_by=16)
    fields.update(overrides)
    torch.manual_seed(0)
    return GPTModelProvider(**fields).provide().eval()


def examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


def pack(rows_of_examples, length):
    """Rows of concatenated examples, right-padded: tokens, positions restarting per example, cu_seqlens."""
    tokens = torch.zeros(len(rows_of_examples), length, dtype=torch.long)
    positions = torch.zeros_like(tokens)
    boundaries = [0]
    for r, row in enumerate(rows_of_examples):
        filled = 0
        for example in row:
            tokens[r, filled: filled + len(example)] = example
            positions[r, filled: filled + len(example)] = torch.arange(len(example))
            filled += len(example)
            boundaries.append(r * length + filled)
        positions[r, filled:] = torch.arange(length - filled)
        if filled < length:
            boundaries.append((r + 1) * length)
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    return tokens, positions, PackedSeqParams(cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                              max_seqlen_q=int(cu_seqlens.diff().max()),
                                              max_seqlen_kv=int(cu_seqlens.diff().max()), qkv_format="thd")


MODELS = {
    "full attention": {},
    "sliding window": {"window_size": (3, 0), "window_attn_skip_freq": 2},  # Gemma-like: windowed and global layers
    "window everywhere": {"window_size": (4, 0)},  # Mistral-like
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_inside_a_pack_equal_each_example_alone(name):
    model = build(**MODELS[name])
    rows = [examples([7, 12, 5]), examples([20, 9], seed=1)]
    tokens, positions, params = pack(rows, 32)
    with torch.no_grad():
        packed = model(tokens, positions, None, packed_seq_params=params)
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                alone = model(example.unsqueeze(0))[0]
                torch.testing.assert_close(packed[r, start: start + len(example)], alone, atol=1e-5, rtol=1e-5)
                start += len(example)
        # Without the boundaries the later examples see the earlier ones.
        unaware = model(tokens, positions)
    assert (unaware[0, 7:19] - packed[0, 7:19]).abs().max() > 1e-3


def test_losses_with_labels_and_default_positions():
    model = build(window_size=(3, 0), window_attn_skip_freq=2)
    rows = [examples([6, 10, 4])]
    tokens, positions, params = pack(rows, 24)
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        given = model(tokens, positions, None, labels=labels, packed_seq_params=params)
        derived = model(tokens, None, None, labels=labels, packed_seq_params=params)
    assert given.shape == (1, 24)
    torch.testing.assert_close(derived, given)
    assert torch.equal(params.position_ids(1, 24), positions)


def test_document_mask_is_block_diagonal_and_causal():
    document_ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    allowed = same_document_causal(document_ids)[0, 0]
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1],
    ]
    windowed = AttentionMask(seq_length=6, device=torch.device("cpu"), document_ids=document_ids).for_window(1)
    assert windowed[0, 0, 4].int().tolist() == [0, 0, 0, 1, 1, 0]  # window of 2 keys, inside the document


def test_document_spans_cut_every_row_at_its_examples():
    # Rows of 8: examples at 0-3 and 3-11 (crossing into row 1), then 11-16; an empty example at 16.
    assert DocumentSpans.from_cu_seqlens([0, 3, 11, 16, 16], batch=2, seq=8).lengths == ((3, 5), (3, 5))


def test_per_example_attention_equals_the_block_diagonal_mask_forward_and_backward():
    """The CPU's packed path (one causal call per example) against one SDPA call with the dense mask."""
    seq = 40
    torch.manual_seed(0)
    config = GPTModelProvider(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=48, seq_length=seq, vocab_size=VOCAB)
    attn = Attention(config)
    lengths = [[11, 25, 4], [40]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    cu_seqlens = [0, 11, 36, 40, 80]
    rope = rotary_cos_sin(torch.arange(seq).expand(2, seq), attn.head_dim, config.rotary_base)
    cpu = torch.device("cpu")
    spans = AttentionMask(seq_length=seq, device=cpu, document_ids=document_ids,
                          document_spans=DocumentSpans.from_cu_seqlens(cu_seqlens, 2, seq)).for_window(None)
    dense = AttentionMask(seq_length=seq, device=cpu, document_ids=document_ids).for_window(None)
    assert isinstance(spans, DocumentSpans) and isinstance(dense, torch.Tensor)
    x = torch.randn(2, seq, config.hidden_size)
    grads = []
    for mask in (spans, dense):
        attn.zero_grad()
        inputs = x.clone().requires_grad_()
        out = attn(inputs, rope, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), inputs.grad, attn.linear_q.weight.grad.clone()))
    for mine, reference in zip(*grads, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    # A windowed layer keeps the dense band (the spans know no window).
    windowed = AttentionMask(seq_length=seq, device=cpu, document_ids=document_ids,
                             document_spans=DocumentSpans.from_cu_seqlens(cu_seqlens, 2, seq)).for_window(5)
    assert isinstance(windowed, torch.Tensor)


def test_a_loss_mask_skips_the_logits_of_uncounted_positions_and_changes_no_counted_loss():
    model = build().train()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.zeros(2, 24)
    loss_mask[0, 10:20], loss_mask[1, 3:5] = 1.0, 1.0
    results = []
    for kwargs in ({}, {"loss_mask": loss_mask}):
        model.zero_grad()
        losses = model(tokens, labels=labels, **kwargs)
        (losses * loss_mask).sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (selected, selected_grads) = results
    assert selected.shape == full.shape and selected.dtype == torch.float32
    assert torch.equal(selected[loss_mask == 0], torch.zeros(int((loss_mask == 0).sum())))
    torch.testing.assert_close(selected[loss_mask != 0], full[loss_mask != 0], atol=1e-6, rtol=1e-6)
    for mine, reference in zip(selected_grads, full_grads, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=1e-5)
    nothing = model(tokens, labels=labels, loss_mask=torch.zeros(2, 24))  # a micro-batch of prompts only
    assert torch.equal(nothing, torch.zeros(2, 24))


# Eager FlexAttention warns that it is unfused; it is the mask, not the speed, under test here.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window_left", [None, 39])
def test_flex_document_block_mask_matches_the_dense_mask(window_left):
    """The GPU path's mask (FlexAttention's forward runs on the CPU too, without autograd)."""
    seq = 160  # one full 128-block and a partial one; documents cross the block border
    torch.manual_seed(0)
    config = GPTModelProvider(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=48, seq_length=seq, vocab_size=VOCAB)
    attn = Attention(config).eval()
    x = torch.randn(2, seq, config.hidden_size)
    lengths = [[50, 90, 20], [130, 30]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    rope = rotary_cos_sin(torch.arange(seq).expand(2, seq), attn.head_dim, config.rotary_base)
    cpu = torch.device("cpu")
    dense = AttentionMask(seq_length=seq, device=cpu, document_ids=document_ids).for_window(window_left)
    block = AttentionMask(seq_length=seq, device=cpu, document_ids=document_ids, block_sparse=True).for_window(
        window_left)
    assert isinstance(dense, torch.Tensor) and not isinstance(block, torch.Tensor)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope, block), attn(x, rope, dense), atol=1e-5, rtol=1e-5)


def test_get_packed_seq_params_from_a_batch():
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    params = get_packed_seq_params({"cu_seqlens": cu_seqlens, "max_seqlen": torch.tensor(5, dtype=torch.int32)})
    assert params.qkv_format == "thd" and params.cu_seqlens_q is cu_seqlens and params.cu_seqlens_kv is cu_seqlens
    assert params.max_seqlen_q == params.max_seqlen_kv == 5 and isinstance(params.max_seqlen_q, int)
    upstream = get_packed_seq_params({"cu_seqlens": cu_seqlens.unsqueeze(0)})  # [1, n], as upstream collates
    assert torch.equal(upstream.cu_seqlens_q, cu_seqlens) and upstream.max_seqlen_q is None
    assert params.document_ids(1, 8).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert params.document_ids(2, 4).tolist() == [[0, 0, 0, 1], [1, 1, 1, 1]]  # rows are boundaries too


@pytest.mark.parametrize(("params", "message"), [
    (PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 8])), "qkv_format='sbhd' is invalid"),
    (PackedSeqParams(cu_seqlens_q=torch.tensor([0.0, 8.0])), "must be a 1-D integer tensor"),
    (PackedSeqParams(cu_seqlens_q=torch.tensor([0, 6])), r"cu_seqlens_q=\[0, 6\] is invalid: .* to batch \* seq = 8"),
    (PackedSeqParams(cu_seqlens_q=torch.tensor([0, 5, 3, 8])), "non-decreasing"),
    (PackedSeqParams(cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_kv=torch.tensor([0, 4, 8])),
     "cu_seqlens_kv must equal cu_seqlens_q"),
])
def test_bad_packed_seq_params_are_refused(params, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 8, dtype=torch.long), packed_seq_params=params)


@needs_gpu
def test_gpu_packed_batch_trains_like_the_cpu_and_never_builds_a_dense_mask():
    from torch.nn.attention.flex_attention import BlockMask

    cpu_model = build(window_size=(63, 0), window_attn_skip_freq=2, seq_length=300).train()
    gpu_model = build(window_size=(63, 0), window_attn_skip_freq=2, seq_length=300).train().cuda()
    rows = [examples([100, 150, 40]), examples([290], seed=1)]
    tokens, positions, params = pack(rows, 300)
    gpu_params = PackedSeqParams(cu_seqlens_q=params.cu_seqlens_q.cuda(), cu_seqlens_kv=params.cu_seqlens_q.cuda())
    masks = AttentionMask(seq_length=300, device=torch.device("cuda"), block_sparse=True,
                          document_ids=gpu_params.document_ids(2, 300))
    assert [type(mask) for _, mask in gpu_model._layer_inputs(positions.cuda(), masks)] == [BlockMask, BlockMask]
    losses = []
    for model, device, packed in ((cpu_model, "cpu", params), (gpu_model, "cuda", gpu_params)):
        loss = model(tokens.to(device), positions.to(device), None, labels=tokens.to(device),
                     packed_seq_params=packed).mean()
        loss.backward()
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, cpu_param), gpu_param in zip(cpu_model.named_parameters(), gpu_model.parameters(), strict=True):
        torch.testing.assert_close(gpu_param.grad.cpu(), cpu_param.grad, atol=1e-5, rtol=1e-3, msg=name)


@needs_gpu
def test_gpu_packed_batch_refuses_attention_dropout():
    model = build(attention_dropout=0.1).train().cuda()
    params = PackedSeqParams(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="model.attention_dropout=0.1 is invalid with packed sequences on CUDA"):
        model(torch.zeros(1, 8, dtype=torch.long, device="cuda"), packed_seq_params=params)
