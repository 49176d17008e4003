"""Packing documents into samples: the three indices, their cache, the sample fields, and bad-data errors."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from megatron.bridge.data import gpt_dataset
from megatron.bridge.data.builder import build_gpt_datasets
from megatron.bridge.data.gpt_dataset import (
    INDEX_SCHEME,
    GPTDataset,
    SampleOptions,
    make_sample,
    split_document_ranges,
)
from megatron.bridge.data.index_cache import cache_paths
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
    # The shuffle covers every sample of the epoch (66 // 7 = 9 per pass, two passes for 10), not only the 10.
    assert ds.num_indexed_samples == (2 * 67 - 1) // 7 == 19 and len(ds) == 10
    assert sorted(ds.shuffle_index.tolist()) == list(range(19))
    for i in range(ds.num_indexed_samples):
        start = int(ds.shuffle_index[i]) * 7
        # seq_length + 1 tokens; the last one is also the first of the following window.
        assert ds.packed_tokens(i).tolist() == text[start : start + 8].tolist()
        sample = ds[i]
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_document_index_repeats_the_documents_over_the_epochs_needed(write_dataset, tmp_path):
    tokens_per_epoch = sum(LENGTHS)  # 67
    ds = build(write_dataset(DOCS), str(tmp_path / "cache"), num_samples=30, seq_length=7)
    epochs = -(-(30 * 7 + 1) // tokens_per_epoch)
    assert epochs == ds.plan.num_epochs == 4 and len(ds.document_index) == epochs * len(DOCS)
    # Every document once per epoch; the epochs are shuffled together, as in Megatron-LM.
    assert np.bincount(ds.document_index).tolist() == [epochs] * len(DOCS)


# ------------------------------------------------------------------- Megatron-LM's order, from its rules
# The expectations below are derived in the tests from Megatron-LM's rules (megatron/core/datasets/
# gpt_dataset.py and helpers.cpp), never from our code: one numpy RandomState(seed) shuffles the
# document ids of all epochs at once (the final epoch on its own when fewer than 80% of an epoch's
# samples come from it), then, continuing the same generator, the ids of every sample of those epochs.

# Document k holds ids 10k, 10k+1, ...: every token names its document.
SMALL_LENGTHS = [3, 5, 2, 4, 6]
SMALL_DOCS = [[10 * k + i for i in range(n)] for k, n in enumerate(SMALL_LENGTHS)]


def token_walk_sample_index(lengths: list[int], document_index: list[int], seq_length: int, count: int) -> list:
    """Row i: (document-index position, offset) of token i * seq_length, found by walking token by token."""
    where = [(position, offset) for position, doc in enumerate(document_index) for offset in range(lengths[doc])]
    return [[0, 0]] + [list(where[i * seq_length]) for i in range(1, count + 1)]


def test_one_epoch_by_hand(write_dataset, tmp_path):
    # 20 tokens, seq_length 4: one epoch holds (20 - 1) // 4 = 4 samples, enough for the 3 requested.
    ds = build(write_dataset(SMALL_DOCS), str(tmp_path / "cache"), num_samples=3, seq_length=4, seed=1234,
               document_range=(0, 5))
    # RandomState(1234).shuffle([0, 1, 2, 3, 4]) gives [4, 0, 1, 2, 3]: lengths 6, 3, 5, 2, 4 in that order,
    # documents ending at tokens 6, 9, 14, 16, 20.
    assert ds.document_index.tolist() == [4, 0, 1, 2, 3] and ds.document_index.dtype == np.int32
    # Samples start at tokens 0, 4, 8, 12, 16: (position 0, offset 0), (0, 4), (1, 2), (2, 3), and token 16
    # is the first of position 4 (document 2 ends at token 16).
    assert ds.sample_index.tolist() == [[0, 0], [0, 4], [1, 2], [2, 3], [4, 0]]
    # The same generator then shuffles the 4 samples: [2, 1, 3, 0] (uint32, as Megatron-LM stores it).
    assert ds.shuffle_index.tolist() == [2, 1, 3, 0] and ds.shuffle_index.dtype == np.uint32
    # The stream is 40..45 | 0 1 2 | 10..14 | 20 21 | 30..33; sample k is its tokens [4k, 4k + 4].
    assert [ds.packed_tokens(i).tolist() for i in range(4)] == [
        [2, 10, 11, 12, 13], [44, 45, 0, 1, 2], [13, 14, 20, 21, 30], [40, 41, 42, 43, 44]]
    rng = np.random.RandomState(1234)  # the same, drawn here rather than read off
    documents = np.arange(5, dtype=np.int32)
    rng.shuffle(documents)
    samples = np.arange(4, dtype=np.uint32)
    rng.shuffle(samples)
    assert ds.document_index.tolist() == documents.tolist() and ds.shuffle_index.tolist() == samples.tolist()


@pytest.mark.parametrize(("num_samples", "epochs", "separate"), [
    (8, 2, False),   # 4 samples per epoch of 20 tokens; 4 of the 8 come from the 2nd epoch: not below int(0.8 * 4)
    (5, 2, True),    # 1 sample from the 2nd epoch, below 3: the final epoch is kept apart
    (10, 3, True),   # 1 sample from the 3rd epoch: the first two are shuffled together, the 3rd apart
    (14, 3, False),  # 5 from the 3rd epoch
])
def test_several_epochs_follow_megatrons_rules(write_dataset, tmp_path, num_samples, epochs, separate):
    seed, seq_length, tokens_per_epoch, per_epoch = 77, 4, 20, 4
    ds = build(write_dataset(SMALL_DOCS), str(tmp_path / "cache"), num_samples=num_samples, seq_length=seq_length,
               seed=seed, document_range=(0, 5))
    # Epochs: the fewest whole passes with num_samples * seq_length + 1 tokens.
    assert epochs == -(-(num_samples * seq_length + 1) // tokens_per_epoch) == ds.plan.num_epochs
    before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    assert separate == (num_samples - before_final < int(0.8 * per_epoch)) == ds.plan.separate_final_epoch
    total = (epochs * tokens_per_epoch - 1) // seq_length

    rng = np.random.RandomState(seed)
    if separate:
        earlier = np.tile(np.arange(5, dtype=np.int32), epochs - 1)
        rng.shuffle(earlier)
        final = np.arange(5, dtype=np.int32)
        rng.shuffle(final)
        documents = np.concatenate([earlier, final])
        head, tail = np.arange(before_final, dtype=np.uint32), np.arange(before_final, total, dtype=np.uint32)
        rng.shuffle(head)
        rng.shuffle(tail)
        samples = np.concatenate([head, tail])
    else:
        documents = np.tile(np.arange(5, dtype=np.int32), epochs)
        rng.shuffle(documents)
        samples = np.arange(total, dtype=np.uint32)
        rng.shuffle(samples)
    assert ds.document_index.tolist() == documents.tolist()
    assert ds.sample_index.tolist() == token_walk_sample_index(SMALL_LENGTHS, documents.tolist(), seq_length, total)
    assert ds.shuffle_index.tolist() == samples.tolist()
    if separate:  # the samples read first all end before the final epoch starts
        assert max(ds.shuffle_index[:before_final].tolist()) < before_final


def test_first_fifty_samples_are_megatrons(write_dataset, tmp_path):
    # A larger case, 50 samples over 5 epochs with empty documents: tokens read against the rules.
    rng = np.random.default_rng(5)
    lengths = [int(n) for n in rng.integers(0, 40, size=30)]
    docs = [[(100 * k + i) % 60000 for i in range(n)] for k, n in enumerate(lengths)]
    ds = build(write_dataset(docs), str(tmp_path / "cache"), num_samples=50, seq_length=32, seed=1234,
               document_range=(3, 27))
    tokens_per_epoch, per_epoch = sum(lengths[3:27]), (sum(lengths[3:27]) - 1) // 32
    epochs = -(-(50 * 32 + 1) // tokens_per_epoch)
    before_final = ((epochs - 1) * tokens_per_epoch - 1) // 32
    assert (tokens_per_epoch, epochs, before_final) == (372, 5, 46)
    assert 50 - before_final < int(0.8 * per_epoch)  # 4 samples from the 5th epoch: it is kept apart
    state = np.random.RandomState(1234)
    earlier, final = np.tile(np.arange(3, 27, dtype=np.int32), epochs - 1), np.arange(3, 27, dtype=np.int32)
    state.shuffle(earlier)
    state.shuffle(final)
    head = np.arange(before_final, dtype=np.uint32)
    state.shuffle(head)  # the 50 read come from here and from the separately shuffled rest
    tail = np.arange(before_final, (epochs * tokens_per_epoch - 1) // 32, dtype=np.uint32)
    state.shuffle(tail)
    samples = np.concatenate([head, tail])
    text = np.concatenate([np.asarray(docs[d], dtype=np.int64) for d in np.concatenate([earlier, final])])
    for i in range(50):
        start = int(samples[i]) * 32
        assert ds[i]["tokens"].tolist() == text[start : start + 32].tolist()
        assert ds[i]["labels"].tolist() == text[start + 1 : start + 33].tolist()


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


def test_indices_cached_by_the_old_scheme_are_not_reused(write_dataset, tmp_path):
    prefix, cache = write_dataset(SMALL_DOCS), str(tmp_path / "cache")
    # The files the scheme before Megatron-LM's order left, under the key of its description (no "scheme").
    old_description = {
        "kind": "gpt_sample_indices", "path": os.path.abspath(prefix), "num_sequences": 5,
        "lengths_sha256": IndexedDataset(prefix).lengths_digest, "split": "train", "document_range": [0, 5],
        "seed": 1234, "seq_length": 4, "num_samples": 3,
    }
    old_arrays = {"doc_idx": np.arange(5, dtype=np.int32), "sample_idx": np.array([[0, 0], [1, 1], [2, 3], [3, 3]]),
                  "shuffle_idx": np.array([0, 1, 2], dtype=np.int32)}
    os.makedirs(cache)
    old_paths = cache_paths(cache, old_description, gpt_dataset.INDEX_NAMES)
    for name, path in old_paths.items():
        np.save(path, old_arrays[name])
    ds = build(prefix, cache, num_samples=3, seq_length=4, seed=1234, document_range=(0, 5))
    assert ds.index_source == "built" and ds.document_index.tolist() == [4, 0, 1, 2, 3]  # Megatron-LM's, built anew
    assert all(np.array_equal(np.load(path), old_arrays[name]) for name, path in old_paths.items())  # left alone
    (description,) = glob.glob(f"{cache}/*_description.json")
    with open(description) as f:
        assert json.load(f)["scheme"] == INDEX_SCHEME


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


def test_split_without_documents_is_rejected_saying_which_split_works(write_dataset):
    prefix = write_dataset(DOCS[:3])
    with pytest.raises(DatasetError, match=r"the validation split of .*ds has no documents: dataset.split='969,30,1' "
                                           r"gives it documents \[3, 3\) of the 3 in the dataset; set dataset.split "
                                           r"so that each split gets documents, e.g. dataset.split=34,33,33 \(this "
                                           r"dataset has 3 documents\)"):
        build_gpt_datasets(config(prefix, split="969,30,1"), num_samples=(4, 4, 0), vocab_size=1000, eod=EOD)
    with pytest.raises(DatasetError, match=r"has only 2 documents, too few for three splits: add documents, or set "
                                           r"dataset.split=100,0,0"):
        build_gpt_datasets(config(write_dataset(DOCS[:2], name="two"), split="98,1,1"), num_samples=(4, 4, 4),
                           vocab_size=1000, eod=EOD)


def test_a_split_without_data_is_announced_when_passes_ask_for_it(write_dataset, capsys):
    train, valid, test = build_gpt_datasets(config(write_dataset(DOCS), split="100,0,0"), num_samples=(4, 4, 4),
                                            vocab_size=1000, eod=EOD)
    assert train is not None and valid is None and test is None
    out = capsys.readouterr().out
    assert ("> dataset.split='100,0,0' gives the validation split no data: no validation passes run, though "
            "validation.eval_iters asks for 4 samples") in out
    assert "gives the test split no data: no test passes run" in out
    build_gpt_datasets(config(write_dataset(DOCS, name="again"), split="100,0,0"), num_samples=(4, 0, 0),
                       vocab_size=1000, eod=EOD)
    assert "no data" not in capsys.readouterr().out  # nothing asked for, nothing to say


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
