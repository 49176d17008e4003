"""Batches without waste: padding per global batch, masks, data-parallel slices, resume; the config's checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron.bridge.data import (
    ChatSFTPreprocessingConfig,
    FinetuningDatasetConfig,
    GPTSFTDatasetConfig,
    NullTokenizer,
    PackedSequenceSpecs,
    PromptCompletionSFTPreprocessingConfig,
    build_sft_data_iterators,
)
from megatron.bridge.data.sft.collate import GlobalBatchSampler
from megatron.bridge.utils.errors import ConfigError

TOKENIZER = NullTokenizer(100)
EOS = 99


def rows_of_lengths(lengths):
    """Prompt/completion rows whose examples have `n` ids each: prompt 1, answer n - 2, eos."""
    return [{"input": "1", "output": " ".join(str(2 + (j % 90)) for j in range(n - 2))} for n in lengths]


def iterators(config, **overrides):
    kwargs = dict(micro_batch_size=2, global_batch_size=4, train_samples=400, valid_samples=0, test_samples=0)
    kwargs.update(overrides)
    return build_sft_data_iterators(config, TOKENIZER, **kwargs)


def test_each_global_batch_is_padded_to_its_longest_example_rounded_up(dataset):
    lengths = [5, 9, 3, 20, 40, 6, 7, 8]  # ids per example; positions (and here loss tokens) are one fewer
    config = dataset(rows_of_lengths(lengths), seq_length=48, pad_to_multiple_of=16)
    data, stats = iterators(config)
    for _ in range(2):  # two epochs of two global batches
        seen = []
        for _ in range(2):
            micro_batches = [next(data.train), next(data.train)]
            length = micro_batches[0]["tokens"].shape[1]
            assert micro_batches[1]["tokens"].shape[1] == length  # one length for the whole global batch
            in_batch = [int(row.sum()) for batch in micro_batches for row in batch["loss_mask"]]
            assert length == min(-(-max(in_batch) // 16) * 16, 48)
            seen += in_batch
        assert sorted(seen) == sorted(n - 1 for n in lengths)
    assert stats.splits["train"].rows == len(lengths) and stats.splits["train"].pack_size is None


def test_pads_are_masked_and_labels_are_the_next_tokens(dataset):
    config = dataset([{"input": "1 2", "output": "3 4"}, {"input": "5", "output": "6 7 8 9 10 11"}],
                     seq_length=32, pad_to_multiple_of=4)
    batch = next(iterators(config, global_batch_size=2, micro_batch_size=2)[0].train)
    by_first = {int(row[0]): i for i, row in enumerate(batch["tokens"])}
    short, long = by_first[1], by_first[5]
    assert batch["tokens"].shape == (2, 8) and batch["tokens"].dtype == torch.int64
    assert batch["tokens"][short].tolist() == [1, 2, 3, 4] + [EOS] * 4
    assert batch["labels"][short].tolist() == [2, 3, 4, EOS] + [EOS] * 4
    assert batch["loss_mask"][short].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]  # 3, 4 and eos; never the pads
    assert batch["loss_mask"][long].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert "cu_seqlens" not in batch


def test_data_parallel_ranks_read_slices_of_the_same_global_batches(dataset):
    config = dataset(rows_of_lengths([3 + 2 * i for i in range(12)]), seq_length=64)
    single = iterators(config, micro_batch_size=2, global_batch_size=4)[0].train
    ranks = [iterators(config, micro_batch_size=1, global_batch_size=4, dp_rank=r, dp_size=2)[0].train
             for r in range(2)]
    for _ in range(6):
        whole = torch.cat([next(single)["tokens"] for _ in range(2)])
        parts = torch.cat([next(rank)["tokens"] for rank in ranks for _ in range(2)])
        assert torch.equal(whole, parts)


def test_resume_from_consumed_samples_continues_identically(dataset):
    config = dataset(rows_of_lengths([3 + i for i in range(10)]), seq_length=64)
    fresh = iterators(config)[0].train
    expected = [next(fresh)["tokens"] for _ in range(20)][6:]  # 2 micro-batches per step: step 3 on
    resumed = iterators(config, consumed_train_samples=3 * 4)[0].train
    assert all(torch.equal(next(resumed)["tokens"], tokens) for tokens in expected)


def test_every_epoch_is_a_new_shuffle_of_all_rows():
    sampler = GlobalBatchSampler(np.arange(1, 9), micro_batch_size=2, global_batch_size=4, seed=3, max_length=8)
    plans = list(itertools.islice(iter(sampler), 8))  # 4 steps = 2 epochs of 8 rows
    epochs = [[row for plan in plans[e * 4:(e + 1) * 4] for row in plan.rows] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and epochs[0] != epochs[1]
    unshuffled = GlobalBatchSampler(np.arange(1, 9), micro_batch_size=2, global_batch_size=4, shuffle=False,
                                    max_length=8)
    assert [p.rows for p in itertools.islice(iter(unshuffled), 4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_validation_and_test_splits_cycle_in_order_and_resume(dataset):
    rows = rows_of_lengths([4, 5, 6])
    config = dataset(rows, valid=rows, test=rows, seq_length=16)
    data, stats = iterators(config, micro_batch_size=1, global_batch_size=2, valid_samples=8, test_samples=2,
                            consumed_valid_samples=2)
    assert [int(next(data.valid)["loss_mask"].sum()) for _ in range(4)] == [5, 3, 4, 5]  # from sample 2
    assert sorted(stats.splits) == ["test", "train", "valid"] and data.test is not None
    no_eval, _ = iterators(dataset(rows, valid=rows, test=rows, do_validation=False), valid_samples=8, test_samples=0)
    assert no_eval.valid is None and no_eval.test is None


def test_aliases_and_defaults():
    assert FinetuningDatasetConfig is GPTSFTDatasetConfig
    config = GPTSFTDatasetConfig(seq_length=8)
    assert (config.dataloader_type, config.pad_to_multiple_of, config.seed, config.do_validation, config.do_test) == (
        "batch", 16, 1234, True, True)
    assert PromptCompletionSFTPreprocessingConfig().add_eos and ChatSFTPreprocessingConfig().loss_mode == "assistant"
    assert PackedSequenceSpecs(2048).packing_algorithm == "first_fit_shuffle"


INVALID = [
    ({"seq_length": 0}, "dataset.seq_length=0 is invalid"),
    ({"dataloader_type": "single"}, "dataset.dataloader_type='single' is invalid: choose one of batch"),
    ({"pad_to_multiple_of": 0}, "dataset.pad_to_multiple_of=0 is invalid"),
    ({"max_train_samples": 0}, "dataset.max_train_samples=0 is invalid"),
    ({"do_test": "yes"}, "dataset.do_test='yes' is invalid: True or False"),
    ({"enable_offline_packing": True}, "dataset.offline_packing_specs=None is invalid: a PackedSequenceSpecs when"),
    ({"offline_packing_specs": PackedSequenceSpecs(8)}, "dataset.offline_packing_specs=.* is invalid: None unless"),
    ({"enable_offline_packing": True, "offline_packing_specs": PackedSequenceSpecs(0)},
     r"dataset.offline_packing_specs.packed_sequence_size=0 is invalid"),
    ({"enable_offline_packing": True, "offline_packing_specs": PackedSequenceSpecs(99)},
     r"packed_sequence_size=99 is invalid: at most dataset.seq_length=64"),
    ({"enable_offline_packing": True, "offline_packing_specs": PackedSequenceSpecs(8, packing_algorithm="best")},
     r"dataset.offline_packing_specs.packing_algorithm='best' is invalid: choose one of first_fit_shuffle"),
    ({"preprocessing": PromptCompletionSFTPreprocessingConfig(prompt_template="{question}")},
     r"dataset.preprocessing.prompt_template='{question}' is invalid"),
    ({"preprocessing": PromptCompletionSFTPreprocessingConfig(prompt_template="{prompt} {prompt}")},
     r"dataset.preprocessing.prompt_template=.* is invalid"),
    ({"preprocessing": PromptCompletionSFTPreprocessingConfig(loss_mode="answer")},
     r"dataset.preprocessing.loss_mode='answer' is invalid: choose one of completion, full"),
    ({"preprocessing": PromptCompletionSFTPreprocessingConfig(truncation_method="middle")},
     r"dataset.preprocessing.truncation_method='middle' is invalid"),
    ({"preprocessing": ChatSFTPreprocessingConfig(loss_mode="completion")},
     r"dataset.preprocessing.loss_mode='completion' is invalid: choose one of assistant, last_turn, full"),
    ({"preprocessing": {"loss_mode": "full"}}, r"dataset.preprocessing=.* is invalid: None, a Prompt"),
    ({"do_validation": True}, r"dataset.dataset_root=.* is invalid: a folder holding validation.jsonl \(or set "
                              r"dataset.do_validation=False\)"),
]


@pytest.mark.parametrize(("fields", "message"), INVALID, ids=[m.split("=")[0] for _, m in INVALID])
def test_config_errors_name_the_field(dataset, fields, message):
    config = dataset([{"input": "1", "output": "2"}], **fields)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_missing_root_is_named(tmp_path):
    with pytest.raises(ConfigError, match="dataset.dataset_root=None is invalid: a folder holding training.jsonl"):
        GPTSFTDatasetConfig(seq_length=8).validate()
    with pytest.raises(ConfigError, match="dataset.dataset_root=.* is invalid: a folder holding training.jsonl"):
        GPTSFTDatasetConfig(seq_length=8, dataset_root=tmp_path).validate()
