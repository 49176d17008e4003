"""Blend specifications, the greedy blending index, and weighted blends of real datasets."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.bridge.data.blend import parse_blend
from megatron.bridge.data.blended_dataset import BlendedDataset, build_blend_indices
from megatron.bridge.data.builder import build_gpt_datasets
from megatron.bridge.data.indexed_dataset import DatasetError
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


def megatron_blend(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """Megatron-LM's rule, written out: sample i goes to the d maximising w[d] * max(i, 1) - count[d] (first wins)."""
    counts, datasets, numbers = [0] * len(weights), [], []
    for i in range(size):
        errors = [w * float(max(i, 1)) - float(c) for w, c in zip(weights, counts, strict=True)]
        best = errors.index(max(errors))
        datasets.append(best)
        numbers.append(counts[best])
        counts[best] += 1
    return datasets, numbers


def test_blend_assignment_by_hand():
    # [0.3, 0.7]: sample 0 (error weighted by max(0, 1) = 1): 0.3 vs 0.7 -> 1; sample 1 (again by 1): 0.3 - 0
    # vs 0.7 - 1 -> 0; sample 2: 0.6 - 1 vs 1.4 - 1 -> 1; sample 3: 0.9 - 1 vs 2.1 - 2 -> 1; sample 4:
    # 1.2 - 1 vs 2.8 - 3 -> 0; then 1, 1, 0, 1, 1.
    dataset_index, sample_index = build_blend_indices([0.3, 0.7], 10)
    assert dataset_index.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1] and dataset_index.dtype == np.int16
    assert sample_index.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6] and sample_index.dtype == np.int64
    # Equal errors go to the lower index: [0.5, 0.5] alternates from dataset 0.
    assert build_blend_indices([0.5, 0.5], 6)[0].tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("weights", [
    [0.3, 0.7], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.97, 0.01, 0.02], [0.1] * 10,
    [0.5 - 2e-4, 0.5, 2e-4],  # a rare dataset: the side-by-side blocks need a long warm-up
])
def test_blend_assignment_is_megatrons_exactly(weights):
    size = 6000
    expected = megatron_blend(weights, size)
    # Many blocks side by side or one; warm-ups too short to settle, so blocks are computed again: all the same.
    for block, warmup in ((16, None), (2048, None), (16, 1), (64, 0)):
        dataset_index, sample_index = build_blend_indices(weights, size, block=block, warmup=warmup)
        assert dataset_index.tolist() == expected[0] and sample_index.tolist() == expected[1]
    counts = np.bincount(dataset_index, minlength=len(weights))
    assert np.all(np.abs(counts - np.array(weights) * size) <= 1.0)


def two_corpora(write_dataset) -> tuple[str, str]:
    # Dataset a holds ids below 100, dataset b ids from 100 up: every sample names its source.
    a = write_dataset([[i % 100 for i in range(k, k + 50)] for k in range(40)], name="a")
    b = write_dataset([[100 + i % 100 for i in range(k, k + 50)] for k in range(40)], name="b")
    return a, b


def test_weighted_blend_sizes_and_order_are_megatrons(write_dataset):
    a, b = two_corpora(write_dataset)
    cfg = GPTDatasetConfig(seq_length=16, random_seed=5, blend=(["30", a, "70", b]), split="1")
    train, _, _ = build_gpt_datasets(cfg, num_samples=(333, 0, 0), vocab_size=200, eod=199)
    assert isinstance(train, BlendedDataset)
    # ceil(333 * 0.3) = 100 and ceil(333 * 0.7) = 234 samples served, so 334 in all; each dataset is built
    # for ceil(served * 1.005): 101 and 236 samples.
    assert len(train) == 334 and [ds.num_samples for ds in train.datasets] == [101, 236]
    weights = (np.array([30.0, 70.0]) / 100.0).tolist()
    weights = (np.array(weights) / np.sum(weights)).tolist()  # Megatron-LM normalises twice
    expected_datasets, expected_numbers = megatron_blend(weights, 334)
    assert train.dataset_index.tolist() == expected_datasets
    assert train.dataset_sample_index.tolist() == expected_numbers
    from_b = [bool(train[i]["tokens"][0] >= 100) for i in range(len(train))]
    assert from_b == [d == 1 for d in expected_datasets] and sum(from_b) == 234
    # Cached: the same blend again gives the same samples, loaded rather than rebuilt.
    again, _, _ = build_gpt_datasets(cfg, num_samples=(333, 0, 0), vocab_size=200, eod=199)
    assert [ds.index_source for ds in again.datasets] == ["loaded", "loaded"]
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 334, 37))


def test_one_weighted_path_is_a_blend_of_one(write_dataset):
    a, _ = two_corpora(write_dataset)
    cfg = GPTDatasetConfig(seq_length=16, random_seed=5, blend=([a], [1.0]), split="1")
    train, _, _ = build_gpt_datasets(cfg, num_samples=(249, 0, 0), vocab_size=200, eod=199)
    # As in Megatron-LM: built for ceil(249 * 1.005) = 251 samples. 2000 tokens per epoch: 249 samples need
    # 249 * 16 + 1 = 3985 tokens (2 epochs), 251 need 4017 (3 epochs), so the order differs from a plain path's.
    assert isinstance(train, BlendedDataset) and len(train) == 249 and train.datasets[0].num_samples == 251
    plain, _, _ = build_gpt_datasets(GPTDatasetConfig(seq_length=16, random_seed=5, blend=[a], split="1"),
                                     num_samples=(249, 0, 0), vocab_size=200, eod=199)
    assert (plain.plan.num_epochs, train.datasets[0].plan.num_epochs) == (2, 3)
    assert train.dataset_index.tolist() == [0] * 249 and train.dataset_sample_index.tolist() == list(range(249))


def test_unweighted_blend_weighs_one_epoch_of_each(write_dataset):
    small = write_dataset([[1] * 30] * 10, name="small")  # 300 tokens: (300 - 1) // 8 = 37 samples per epoch
    large = write_dataset([[2] * 30] * 30, name="large")  # 900 tokens: 112 samples
    cfg = GPTDatasetConfig(seq_length=8, random_seed=0, blend=[small, large], split="1")
    train, _, _ = build_gpt_datasets(cfg, num_samples=(100, 0, 0), vocab_size=10, eod=9)
    assert [len(ds) for ds in train.datasets] == [37, 112] and len(train) == 100
    assert train.dataset_index.tolist() == megatron_blend((np.array([37, 112]) / 149).tolist(), 100)[0]
    # More than one epoch of each cannot be had without weights: refused before training (Megatron-LM would run dry).
    with pytest.raises(DatasetError, match=r"holds 149 train samples \(one epoch of each dataset.*400 requested"):
        build_gpt_datasets(cfg, num_samples=(400, 0, 0), vocab_size=10, eod=9)
    cyclic = GPTDatasetConfig(seq_length=8, random_seed=0, blend=[small, large], split="1", dataloader_type="cyclic")
    train, _, _ = build_gpt_datasets(cyclic, num_samples=(400, 0, 0), vocab_size=10, eod=9)
    assert len(train) == 149 and np.bincount(train.dataset_index).tolist() == [37, 112]
