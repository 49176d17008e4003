"""Finetuning data through the real training loop: `pretrain` with a `GPTSFTDatasetConfig`, callbacks and all."""

from __future__ import annotations

from test_sft_training import ANSWER, VOCAB, random_prompt_rows

from helpers import make_tiny_config
from megatron.bridge.data import NullTokenizer, PackedSequenceSpecs
from megatron.bridge.data.sft.builder import build_sft_split
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


class Trace(Callback):
    """The events in order, the training losses, and every training batch's supervised labels."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.losses: list[float] = []

    def on_train_start(self, context):
        self.events.append("on_train_start")

    def on_train_step_end(self, context):
        self.events.append("on_train_step_end")
        self.losses.append(context.loss_dict["lm loss"].item())

    def on_eval_end(self, context):
        self.events.append("on_eval_end")

    def on_test_end(self, context):
        self.events.append("on_test_end")

    def on_train_end(self, context):
        self.events.append("on_train_end")


def sft_config(config_factory, seq_length=16, **overrides):
    """The tiny run on finetuning data: a NullTokenizer of `VOCAB` ids, `seq_length`-token rows."""
    fields = {"train__global_batch_size": 8, "train__micro_batch_size": 4, "optimizer__lr": 1e-2,
              "validation__eval_iters": 1, **overrides}
    cfg = make_tiny_config(**fields)
    cfg.model.seq_length = seq_length
    cfg.model.vocab_size = None
    cfg.tokenizer.vocab_size = VOCAB
    cfg.dataset = config_factory()
    return cfg


def test_answers_are_learned_through_pretrain_and_the_events_fire_as_in_pretraining(dataset):
    rows = random_prompt_rows(32)
    trace = Trace()
    cfg = sft_config(lambda: dataset(rows, valid=rows[:8], test=rows[:8], seq_length=16, pad_to_multiple_of=8),
                     train__train_iters=40)
    pretrain(cfg, forward_step, [trace])
    assert trace.losses[-1] < 0.1 < trace.losses[0], (trace.losses[0], trace.losses[-1])
    assert trace.events == (["on_train_start"] + ["on_train_step_end"] * 40
                            + ["on_train_end", "on_eval_end", "on_test_end"])


def test_a_packed_run_starts_with_the_loss_of_the_padded_one(dataset):
    rows = random_prompt_rows(8, seed=5)
    for i, row in enumerate(rows):  # answers of different lengths: each example weighs by its tokens
        row["output"] = " ".join(map(str, ANSWER[: 1 + i % 3]))
    specs = PackedSequenceSpecs(32, packing_algorithm="first_fit_decreasing")
    packs = build_sft_split(dataset(rows, seq_length=32, enable_offline_packing=True, offline_packing_specs=specs),
                            NullTokenizer(VOCAB), "train").stats.rows
    first_losses = []
    for factory, batch in ((lambda: dataset(rows, seq_length=32), (8, 4)),
                           (lambda: dataset(rows, seq_length=32, enable_offline_packing=True,
                                            offline_packing_specs=specs), (packs, 1))):
        trace = Trace()
        cfg = sft_config(factory, 32, train__train_iters=1, validation__eval_iters=0,
                         train__global_batch_size=batch[0], train__micro_batch_size=batch[1])
        pretrain(cfg, forward_step, [trace])
        first_losses.append(trace.losses[0])
    assert packs < 8
    assert abs(first_losses[0] - first_losses[1]) < 1e-5, first_losses


class ModelInputs(Callback):
    """The keyword arguments the default forward step hands the model, recorded by a forward pre-hook."""

    def __init__(self) -> None:
        self.keywords: list[set[str]] = []

    def on_train_start(self, context):
        def record(module, args, kwargs):
            self.keywords.append(set(kwargs))

        context.model[0].register_forward_pre_hook(record, with_kwargs=True)


def test_finetuning_batches_hand_the_model_their_loss_mask_and_pretraining_batches_do_not(dataset):
    rows = random_prompt_rows(16)
    finetuning = ModelInputs()
    pretrain(sft_config(lambda: dataset(rows, seq_length=16, pad_to_multiple_of=8), train__train_iters=2,
                        validation__eval_iters=0), forward_step, [finetuning])
    assert finetuning.keywords and all("loss_mask" in keys for keys in finetuning.keywords)
    pretraining = ModelInputs()
    pretrain(make_tiny_config(train__train_iters=2, validation__eval_iters=0), forward_step, [pretraining])
    assert pretraining.keywords and not any("loss_mask" in keys for keys in pretraining.keywords)
