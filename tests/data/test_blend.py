"""Blend specifications, the greedy blending index, and weighted blends of real datasets."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.bridge.data.blend import parse_blend
from megatron.bridge.data.blended_dataset import BlendedDataset, build_blend_indices
from megatron.bridge.data.builder import build_gpt_datasets
from megatron.bridge.training.config import GPTDatasetConfig


@pytest.mark.parametrize(("blend", "expected"), [
    ((["a", "b"], [0.3, 0.7]), (["a", "b"], [0.3, 0.7])),
    ([["a", "b"], [3, 7]], (["a", "b"], [3.0, 7.0])),
    ((["a"], None), (["a"], None)),
    (["30", "a", "70", "b"], (["a", "b"], [30.0, 70.0])),
    ([30, "a", 70, "b"], (["a", "b"], [30.0, 70.0])),
    (["a"], (["a"], None)),
    (["a", "b"], (["a", "b"], None)),
    ("a", (["a"], None)),
])
def test_blend_spellings(blend, expected):
    assert parse_blend(blend, None) == expected
    assert parse_blend(None, blend) == expected  # data_path takes the same forms


@pytest.mark.parametrize(("blend", "fragment"), [
    ((["a", "b"], [0.3, -0.7]), "weight -0.7 is not a positive number"),
    ((["a", "b"], [1.0]), "2 weights, one per path"),
    (["30", "a", "b"], "weights and paths must alternate"),
    (["a", "30", "b", "70"], "weights and paths must alternate"),
    (["0", "a"], "weight '0' is not a positive number"),
    ([], "use (["),
    (42, "use (["),
])
def test_bad_blends_name_the_problem(blend, fragment):
    with pytest.raises(ValueError) as info:
        parse_blend(blend, None)
    assert str(info.value).startswith("dataset.blend=") and fragment in str(info.value)


def test_blend_and_data_path_together_are_rejected():
    with pytest.raises(ValueError, match="dataset.data_path='b' is invalid: None when dataset.blend is set"):
        parse_blend(["a"], "b")


def test_config_validation_names_the_missing_file(write_dataset):
    prefix = write_dataset([[1, 2, 3]])
    GPTDatasetConfig(blend=[prefix]).validate()
    with pytest.raises(ValueError, match=r"dataset.blend: dataset file .*missing\.idx does not exist"):
        GPTDatasetConfig(blend=(["30", prefix, "70", prefix[:-2] + "missing"])).validate()
    with pytest.raises(ValueError, match=r"dataset.data_path: dataset file /nowhere/x\.idx does not exist"):
        GPTDatasetConfig(data_path="/nowhere/x").validate()
    with pytest.raises(ValueError, match="weight -1"):
        GPTDatasetConfig(blend=([prefix], [-1])).validate()


def test_greedy_blend_keeps_every_prefix_within_one_sample_of_its_share():
    weights = [0.2, 0.3, 0.5]
    dataset_index, sample_index = build_blend_indices(weights, 10_000)
    counts = np.zeros(3, dtype=np.int64)
    for i, d in enumerate(dataset_index.tolist()):
        assert sample_index[i] == counts[d]  # each dataset is read in its own order, sample 0, 1, 2, ...
        counts[d] += 1
        assert np.all(np.abs(counts - np.array(weights) * (i + 1)) <= 1.0)
    assert counts.tolist() == [2000, 3000, 5000]


def test_weighted_blend_of_two_datasets_matches_the_weights(write_dataset):
    # Dataset a holds ids below 100, dataset b ids from 100 up: every sample names its source.
    a = write_dataset([[i % 100 for i in range(k, k + 50)] for k in range(40)], name="a")
    b = write_dataset([[100 + i % 100 for i in range(k, k + 50)] for k in range(40)], name="b")
    cfg = GPTDatasetConfig(seq_length=16, random_seed=5, blend=(["30", a, "70", b]), split="1")
    train, _, _ = build_gpt_datasets(cfg, num_samples=(1000, 0, 0), vocab_size=200, eod=199)
    assert isinstance(train, BlendedDataset) and len(train) == 1000
    from_b = sum(bool(train[i]["tokens"][0] >= 100) for i in range(len(train)))
    # The greedy blend is exact to one sample: 700 of 1000 (tolerance 0.1%).
    assert abs(from_b / 1000 - 0.7) <= 0.001
    # Cached: the same blend again gives the same samples.
    again, _, _ = build_gpt_datasets(cfg, num_samples=(1000, 0, 0), vocab_size=200, eod=199)
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 1000, 97))


def test_unweighted_blend_follows_dataset_sizes(write_dataset):
    small = write_dataset([[1] * 30] * 10, name="small")  # 300 tokens
    large = write_dataset([[2] * 30] * 30, name="large")  # 900 tokens
    cfg = GPTDatasetConfig(seq_length=8, random_seed=0, blend=[small, large], split="1")
    train, _, _ = build_gpt_datasets(cfg, num_samples=(400, 0, 0), vocab_size=10, eod=9)
    assert np.bincount(train.dataset_index, minlength=2).tolist() == [100, 300]
