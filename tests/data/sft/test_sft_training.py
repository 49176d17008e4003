"""Finetuning data through a real model and `gpt_step.forward_step`: answer-only learning, packed = padded."""

from __future__ import annotations

import itertools

import torch

from megatron.bridge.data import NullTokenizer, PackedSequenceSpecs, build_sft_data_iterators
from megatron.bridge.data.sft.builder import build_sft_split
from megatron.bridge.models import GPTModelProvider
from megatron.bridge.training.gpt_step import forward_step

VOCAB = 64
ANSWER = [50, 51, 52]
EOS = VOCAB - 1
STEPS = 40


def tiny_model(seq_length: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  seq_length=seq_length, vocab_size=VOCAB, make_vocab_size_divisible_by=16)
    return GPTModelProvider(**{**fields, **overrides}).provide()


def random_prompt_rows(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        prompt = torch.randint(0, 50, (length,), generator=generator).tolist()
        rows.append({"input": " ".join(map(str, prompt)), "output": " ".join(map(str, ANSWER))})
    return rows


def global_batch_loss(model, data_iterator, num_microbatches):
    """Token-weighted loss over one global batch, as the training loop reduces it (sum of sums / tokens)."""
    loss_sum, tokens = 0.0, 0.0
    for _ in range(num_microbatches):
        output, loss_func = forward_step(None, data_iterator, model)
        micro_sum, micro_tokens, _ = loss_func(output)
        loss_sum, tokens = loss_sum + micro_sum, tokens + micro_tokens
    return loss_sum / tokens


def test_fixed_answers_after_random_prompts_are_learned_and_prompts_never_count(dataset):
    config = dataset(random_prompt_rows(32), seq_length=16, pad_to_multiple_of=8, seed=1)
    data, stats = build_sft_data_iterators(config, NullTokenizer(VOCAB), micro_batch_size=4, global_batch_size=8,
                                           train_samples=8 * STEPS, valid_samples=0, test_samples=0)
    assert stats.splits["train"].loss_tokens == 32 * (len(ANSWER) + 1)
    model = tiny_model(16, num_layers=1, hidden_size=32, ffn_hidden_size=64).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    recorder = map(lambda batch: seen.append(batch) or batch, data.train)  # noqa: C417 - keeps every batch
    for _ in range(STEPS):
        optimizer.zero_grad()
        global_batch_loss(model, recorder, num_microbatches=2).backward()
        optimizer.step()
    for batch in seen:  # the loss only ever covered answer tokens and the end of sequence
        assert set(batch["labels"][batch["loss_mask"] > 0].tolist()) <= {*ANSWER, EOS}
    model.eval()
    batch = next(iter(data.train))
    with torch.no_grad():
        per_token = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    answer = batch["loss_mask"] > 0
    prompt = (batch["labels"] < 50) & ~answer  # prompt tokens predicted from earlier prompt tokens
    assert per_token[answer].mean() < 0.05
    assert per_token[prompt].mean() > 2.0  # random tokens, never trained on: not learned (log 50 = 3.9)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(dataset):
    rows = random_prompt_rows(10, seed=3)
    for i, row in enumerate(rows):  # varied answers too, so every example weighs by its own length
        row["output"] = " ".join(str(50 + (i + j) % 12) for j in range(1 + i % 4))
    kwargs = dict(micro_batch_size=2, global_batch_size=10, train_samples=10, valid_samples=0, test_samples=0)
    padded, _ = build_sft_data_iterators(dataset(rows, seq_length=32), NullTokenizer(VOCAB), **kwargs)
    packed_config = dataset(rows, seq_length=32, enable_offline_packing=True,
                            offline_packing_specs=PackedSequenceSpecs(32, packing_algorithm="first_fit_decreasing"))
    num_packs = build_sft_split(packed_config, NullTokenizer(VOCAB), "train").stats.rows
    assert num_packs < 10
    # One global batch holding every pack, one pack per micro-batch.
    packed, _ = build_sft_data_iterators(packed_config, NullTokenizer(VOCAB),
                                         **{**kwargs, "micro_batch_size": 1, "global_batch_size": num_packs})
    losses, grads = [], []
    for data, num_microbatches in ((padded, 5), (packed, num_packs)):
        model = tiny_model(32, window_size=(5, 0), window_attn_skip_freq=2).train()
        loss = global_batch_loss(model, data.train, num_microbatches)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for packed_grad, padded_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_packed_batches_with_several_rows_per_micro_batch(dataset):
    rows = random_prompt_rows(12, seed=4)
    config = dataset(rows, seq_length=24, enable_offline_packing=True, offline_packing_specs=PackedSequenceSpecs(24))
    data, stats = build_sft_data_iterators(config, NullTokenizer(VOCAB), micro_batch_size=2, global_batch_size=2,
                                           train_samples=2, valid_samples=0, test_samples=0)
    model = tiny_model(24).eval()
    num_packs = stats.splits["train"].rows
    with torch.no_grad():
        for batch in itertools.islice(data.train, num_packs):  # every pack, two per micro-batch
            two_rows = global_batch_loss(model, iter([batch]), 1)
            one_by_one = global_batch_loss(model, iter([_row(batch, 0), _row(batch, 1)]), 2)
            torch.testing.assert_close(two_rows, one_by_one, atol=1e-5, rtol=1e-5)


def _row(batch, index):
    """Row `index` of a packed micro-batch as a micro-batch of its own (its boundaries shifted to start at 0)."""
    length = batch["tokens"].shape[1]
    cu = batch["cu_seqlens"].long()
    mine = cu[(cu >= index * length) & (cu <= (index + 1) * length)] - index * length
    out = {key: batch[key][index: index + 1] for key in ("tokens", "labels", "loss_mask", "position_ids")}
    out["cu_seqlens"] = mine.to(torch.int32)
    out["max_seqlen"] = mine.diff().max().to(torch.int32)
    return out
