"""Packing documents into samples: the three indices, their cache, the sample fields, and bad-data errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron.bridge.data import gpt_dataset
from megatron.bridge.data.builder import build_gpt_datasets
from megatron.bridge.data.gpt_dataset import GPTDataset, SampleOptions, make_sample, split_document_ranges
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset
from megatron.bridge.data.mock import MockGPTDataset
from megatron.bridge.training.config import GPTDatasetConfig

EOD = 999
# Distinct ids everywhere (document k holds k*100, k*100+1, ...), lengths varied, one empty document.
LENGTHS = [5, 12, 0, 3, 9, 1, 7, 20, 4, 6]
DOCS = [[k * 100 + i for i in range(n)] for k, n in enumerate(LENGTHS)]


def build(prefix: str, cache_dir: str, *, num_samples: int = 6, seq_length: int = 7, seed: int = 3,
          document_range: tuple[int, int] = (0, len(DOCS))) -> GPTDataset:
    return GPTDataset(IndexedDataset(prefix), split="train", document_range=document_range, num_samples=num_samples,
                      options=SampleOptions(seq_length=seq_length, seed=seed, eod=EOD), cache_dir=cache_dir)


def stream(ds: GPTDataset) -> np.ndarray:
    """All tokens in document-index order: the text the samples are cut from."""
    return np.concatenate([ds.indexed.get(int(d)) for d in ds.document_index])


def test_each_sample_is_the_next_window_of_the_shuffled_documents(write_dataset, tmp_path):
    ds = build(write_dataset(DOCS), str(tmp_path / "cache"), num_samples=10, seq_length=7)
    text = stream(ds)
    assert sorted(ds.shuffle_index.tolist()) == list(range(10))
    for i in range(len(ds)):
        start = int(ds.shuffle_index[i]) * 7
        # seq_length + 1 tokens; the last one is also the first of the following window.
        assert ds.packed_tokens(i).tolist() == text[start : start + 8].tolist()
        sample = ds[i]
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_document_index_repeats_shuffled_epochs_as_needed(write_dataset, tmp_path):
    tokens_per_epoch = sum(LENGTHS)  # 67
    ds = build(write_dataset(DOCS), str(tmp_path / "cache"), num_samples=30, seq_length=7)
    epochs = -(-(30 * 7 + 1) // tokens_per_epoch)
    assert epochs == 4 and len(ds.document_index) == epochs * len(DOCS)
    orders = ds.document_index.reshape(epochs, len(DOCS))
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(DOCS)))
    assert len({tuple(order) for order in orders.tolist()}) > 1  # each epoch reshuffled


def test_split_ranges_partition_the_documents():
    assert split_document_ranges(10, (0.7, 0.2, 0.1)) == [(0, 7), (7, 9), (9, 10)]
    assert split_document_ranges(3, (0.969, 0.03, 0.001)) == [(0, 3), (3, 3), (3, 3)]
    assert split_document_ranges(7, (1 / 3, 1 / 3, 1 / 3)) == [(0, 2), (2, 5), (5, 7)]


def test_same_samples_in_every_build_and_seed_changes_them(write_dataset, tmp_path):
    prefix = write_dataset(DOCS)
    first = build(prefix, str(tmp_path / "a"))
    second = build(prefix, str(tmp_path / "b"))  # another cache: built again from scratch
    other_seed = build(prefix, str(tmp_path / "c"), seed=4)
    assert [first.packed_tokens(i).tolist() for i in range(6)] == [second.packed_tokens(i).tolist() for i in range(6)]
    assert [first.packed_tokens(i).tolist() for i in range(6)] != [other_seed.packed_tokens(i).tolist()
                                                                     for i in range(6)]


def test_cached_indices_are_reused_not_rebuilt(write_dataset, tmp_path, monkeypatch):
    prefix, cache = write_dataset(DOCS), str(tmp_path / "cache")
    first = build(prefix, cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3 and any(f.endswith("_description.json") for f in files)
    assert not any(".tmp" in f for f in files)
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cached indices should have been loaded")

    monkeypatch.setattr(gpt_dataset, "build_sample_index", must_not_build)
    again = build(prefix, cache)
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == mtimes
    assert [again.packed_tokens(i).tolist() for i in range(6)] == [first.packed_tokens(i).tolist() for i in range(6)]
    # A different request is a different cache entry, so it builds (and here fails on purpose).
    with pytest.raises(AssertionError, match="cached indices"):
        build(prefix, cache, num_samples=7)
    # So is the same file rewritten with other document lengths, even with the same count and total.
    write_dataset(DOCS[::-1])
    with pytest.raises(AssertionError, match="cached indices"):
        build(prefix, cache)


def test_sample_fields_follow_the_eod_flags():
    packed = np.array([1, 2, EOD, 3, 4, 5, EOD, 6, 7], dtype=np.int64)
    plain = make_sample(packed, SampleOptions(seq_length=8, seed=0, eod=EOD))
    assert plain["tokens"].tolist() == packed[:-1].tolist() and plain["labels"].tolist() == packed[1:].tolist()
    assert plain["loss_mask"].tolist() == [1.0] * 8 and plain["position_ids"].tolist() == list(range(8))
    assert "attention_mask" not in plain
    flagged = make_sample(packed, SampleOptions(seq_length=8, seed=0, eod=EOD, eod_mask_loss=True,
                                                reset_position_ids=True, reset_attention_mask=True))
    assert flagged["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]
    assert flagged["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    visible = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    visible[3:, :3] = False
    visible[7:, :7] = False
    assert torch.equal(flagged["attention_mask"][0], ~visible)


def test_samples_have_the_mock_datasets_keys_and_dtypes(write_dataset, tmp_path):
    real = GPTDataset(IndexedDataset(write_dataset(DOCS)), split="train", document_range=(0, 10), num_samples=4,
                      options=SampleOptions(seq_length=7, seed=1, eod=EOD, reset_attention_mask=True),
                      cache_dir=str(tmp_path / "cache"))[0]
    mock = MockGPTDataset(num_samples=1, seq_length=7, vocab_size=1000, seed=1, split="train",
                          reset_attention_mask=True)[0]
    assert real.keys() == mock.keys()
    for key in mock:
        assert (real[key].dtype, real[key].shape) == (mock[key].dtype, mock[key].shape), key


# ---------------------------------------------------------------------------------------------- bad data


def config(prefix: str, **overrides) -> GPTDatasetConfig:
    fields = dict(seq_length=7, random_seed=1, blend=[prefix], split="8,1,1")
    return GPTDatasetConfig(**{**fields, **overrides})


def test_token_ids_outside_the_vocabulary_are_rejected(write_dataset):
    prefix = write_dataset(DOCS)
    with pytest.raises(DatasetError, match=r"ds\.bin holds token id 905, outside the tokenizer's vocabulary of 500"):
        build_gpt_datasets(config(prefix), num_samples=(4, 0, 0), vocab_size=500, eod=EOD)


def test_token_range_scan_is_cached(write_dataset, monkeypatch):
    prefix = write_dataset(DOCS)
    build_gpt_datasets(config(prefix), num_samples=(4, 0, 0), vocab_size=1000, eod=EOD)

    def must_not_scan(self):
        raise AssertionError("the token range should come from the cache")

    monkeypatch.setattr(IndexedDataset, "token_range", must_not_scan)
    build_gpt_datasets(config(prefix), num_samples=(4, 0, 0), vocab_size=1000, eod=EOD)
    # The check itself still runs against the cached range.
    with pytest.raises(DatasetError, match="token id 905"):
        build_gpt_datasets(config(prefix), num_samples=(4, 0, 0), vocab_size=900, eod=EOD)


def test_split_without_documents_is_rejected(write_dataset):
    prefix = write_dataset(DOCS[:3])
    with pytest.raises(DatasetError, match=r"the valid split of .*ds has no documents \(3 in the dataset"):
        build_gpt_datasets(config(prefix, split="969,30,1"), num_samples=(4, 4, 0), vocab_size=1000, eod=EOD)


def test_split_smaller_than_one_sample_is_rejected(write_dataset):
    prefix = write_dataset([[1, 2, 3], [4, 5]])
    with pytest.raises(DatasetError, match=r"train split of .*ds is too small: 5 tokens in 2 documents, but one "
                                           r"sample needs seq_length \+ 1 = 8"):
        build_gpt_datasets(config(prefix, split="1"), num_samples=(4, 0, 0), vocab_size=1000, eod=EOD)


def test_small_split_repeats_epochs_instead_of_failing(write_dataset):
    train, valid, test = build_gpt_datasets(config(write_dataset(DOCS), split="1"), num_samples=(200, 8, 8),
                                            vocab_size=1000, eod=EOD)
    assert len(train) == 200 and valid is None and test is None  # splits of weight 0 give no dataset
    assert train.num_samples * 7 > 20 * sum(LENGTHS)  # many epochs


def test_zero_weight_split_gives_no_dataset(write_dataset):
    datasets = build_gpt_datasets(config(write_dataset(DOCS), split="8,0,2"), num_samples=(8, 8, 8),
                                  vocab_size=1000, eod=EOD)
    assert datasets[1] is None and len(datasets[0]) == 8 and len(datasets[2]) == 8
