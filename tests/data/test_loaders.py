import itertools

import numpy as np
import pytest
import torch

from megatron.bridge.data import DataIterators, MicroBatchSampler, MockGPTDataset, build_data_iterators
from megatron.bridge.data.indexed_dataset import DatasetError
from megatron.bridge.training.config import GPTDatasetConfig


def sampler(**overrides) -> MicroBatchSampler:
    kwargs = dict(total_samples=64, micro_batch_size=2, global_batch_size=8)
    kwargs.update(overrides)
    return MicroBatchSampler(**kwargs)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_ranks_split_each_global_batch_exactly(dp_size):
    gbs, mbs = 8, 2
    per_step = gbs // dp_size // mbs
    rank_batches = [list(sampler(dp_rank=r, dp_size=dp_size)) for r in range(dp_size)]
    for batches in rank_batches:
        assert all(len(batch) == mbs for batch in batches)
        assert len(batches) == 64 // gbs * per_step
    for step in range(64 // gbs):
        # Rank-major concatenation: each rank owns a contiguous slice, micro-batches in order.
        seen = [
            index
            for batches in rank_batches
            for batch in batches[step * per_step : (step + 1) * per_step]
            for index in batch
        ]
        assert seen == list(range(step * gbs, (step + 1) * gbs))


@pytest.mark.parametrize("dataloader_type", ["single", "cyclic"])
def test_resume_from_consumed_samples_continues_identically(dataloader_type):
    for rank in range(2):
        fresh = sampler(dp_rank=rank, dp_size=2, dataloader_type=dataloader_type)
        resumed = sampler(dp_rank=rank, dp_size=2, dataloader_type=dataloader_type, consumed_samples=3 * 8)
        per_step = 8 // 2 // 2
        expected = list(itertools.islice(fresh, 3 * per_step, 3 * per_step + 40))
        assert list(itertools.islice(resumed, 40)) == expected


def test_single_stops_after_the_last_full_global_batch():
    batches = list(sampler(total_samples=21))
    assert len(batches) == 8 and batches[-1] == [14, 15]
    assert len(sampler(total_samples=21)) == 8
    assert len(sampler(total_samples=21, consumed_samples=8)) == 4
    assert list(sampler(total_samples=21, consumed_samples=16)) == []


@pytest.mark.parametrize(("old_gbs", "new_gbs"), [(8, 4), (8, 12), (4, 12)])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_a_resume_with_another_batch_size_goes_on_at_the_consumed_sample(old_gbs, new_gbs, dp_size):
    consumed = 3 * old_gbs
    ranks = [list(sampler(total_samples=consumed + 4 * new_gbs, global_batch_size=new_gbs, consumed_samples=consumed,
                          dp_rank=r, dp_size=dp_size)) for r in range(dp_size)]
    per_step = new_gbs // dp_size // 2
    assert all(len(batches) == 4 * per_step for batches in ranks)
    for step in range(4):
        seen = [i for batches in ranks for batch in batches[step * per_step:(step + 1) * per_step] for i in batch]
        start = consumed + step * new_gbs
        assert seen == list(range(start, start + new_gbs))


def test_cyclic_wraps_around_the_dataset():
    batches = list(itertools.islice(sampler(total_samples=6, dataloader_type="cyclic"), 8))
    flat = [index for batch in batches for index in batch]
    assert flat == [i % 6 for i in range(16)]
    with pytest.raises(TypeError):
        len(sampler(dataloader_type="cyclic"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"global_batch_size": 6, "dp_size": 2},
        {"dp_rank": 2, "dp_size": 2},
        {"consumed_samples": -8},
        {"consumed_samples": 8.0},
        {"dataloader_type": "shuffled"},
        {"total_samples": 0, "dataloader_type": "cyclic"},
    ],
)
def test_sampler_rejects_inconsistent_arguments(overrides):
    with pytest.raises(ValueError):
        sampler(**overrides)


def config(**overrides) -> GPTDatasetConfig:
    return GPTDatasetConfig(seq_length=32, random_seed=7, **overrides)


def build(cfg: GPTDatasetConfig, **overrides) -> DataIterators:
    kwargs = dict(
        vocab_size=100, micro_batch_size=2, global_batch_size=8,
        train_samples=32, valid_samples=16, test_samples=0,
    )
    kwargs.update(overrides)
    return build_data_iterators(cfg, **kwargs)


def test_iterators_yield_batched_micro_batches():
    iterators = build(config())
    assert iterators.test is None
    batch = next(iterators.train)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (2, 32) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].shape == (2, 32) and batch["loss_mask"].dtype == torch.float32
    # 32 single-pass samples are 16 micro-batches; one is already taken.
    assert len(list(iterators.train)) == 15
    # Validation is cyclic: it keeps going past its 16 samples.
    assert len(list(itertools.islice(iterators.valid, 20))) == 20


def test_iterators_read_this_ranks_slice_of_the_dataset():
    iterators = build(config(), dp_rank=1, dp_size=2, consumed_train_samples=8, consumed_valid_samples=8)
    train = MockGPTDataset(num_samples=32, seq_length=32, vocab_size=100, seed=7, split="train")
    valid = MockGPTDataset(num_samples=16, seq_length=32, vocab_size=100, seed=7, split="valid")
    # Step 1, rank 1 of 2: samples 12..15 of the global batch 8..15.
    for iterator, dataset in ((iterators.train, train), (iterators.valid, valid)):
        expected = torch.stack([dataset[12]["tokens"], dataset[13]["tokens"]])
        assert torch.equal(next(iterator)["tokens"], expected)


def test_dataset_flags_reach_the_batches():
    cfg = config(eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True)
    batch = next(build(cfg, test_samples=8).test)
    assert batch["attention_mask"].shape == (2, 1, 32, 32)
    eod = batch["tokens"] == 99
    assert torch.equal(batch["loss_mask"], (~eod).float())


def test_zero_sample_splits_give_none():
    iterators = build(config(), train_samples=0, valid_samples=0, test_samples=0)
    assert iterators == DataIterators(train=None, valid=None, test=None)


def test_worker_processes_give_identical_batches():
    def first_batches(num_workers: int) -> list[dict]:
        iterators = build(config(num_workers=num_workers), train_samples=16, valid_samples=0)
        return list(iterators.train)

    serial, parallel = first_batches(0), first_batches(2)
    assert len(serial) == len(parallel) == 8
    for a, b in zip(serial, parallel, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])


def real_config(prefix: str, **overrides) -> GPTDatasetConfig:
    return GPTDatasetConfig(seq_length=32, random_seed=7, data_path=prefix, split="8,1,1", **overrides)


@pytest.fixture
def corpus_prefix(write_dataset):
    rng = np.random.default_rng(0)
    # Documents of 20..80 ids below 99, each ended by the end-of-document id 99.
    return write_dataset([[*rng.integers(0, 99, size=rng.integers(20, 80)).tolist(), 99] for _ in range(60)])


def test_real_data_batches_look_like_mock_batches(corpus_prefix):
    real = build(real_config(corpus_prefix, eod_mask_loss=True, reset_attention_mask=True), test_samples=8)
    mock = build(config(eod_mask_loss=True, reset_attention_mask=True), test_samples=8)
    for split in ("train", "valid", "test"):
        real_batch, mock_batch = next(getattr(real, split)), next(getattr(mock, split))
        assert real_batch.keys() == mock_batch.keys()
        for key in mock_batch:
            assert (real_batch[key].dtype, real_batch[key].shape) == (mock_batch[key].dtype, mock_batch[key].shape)
    batch = next(real.train)
    assert torch.equal(batch["loss_mask"], (batch["tokens"] != 99).float())  # eod = vocab_size - 1 by default


def test_real_data_resumes_exactly_from_consumed_samples(corpus_prefix):
    fresh = list(build(real_config(corpus_prefix), valid_samples=0).train)
    resumed = list(build(real_config(corpus_prefix), valid_samples=0, consumed_train_samples=16).train)
    assert len(fresh) == 16 and len(resumed) == 8
    for a, b in zip(fresh[8:], resumed, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])


def test_real_data_with_worker_processes_gives_identical_batches(corpus_prefix):
    serial = list(build(real_config(corpus_prefix), valid_samples=0).train)
    parallel = list(build(real_config(corpus_prefix, num_workers=2), valid_samples=0).train)
    assert len(serial) == len(parallel) == 16
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_missing_real_data_is_named():
    with pytest.raises(DatasetError, match=r"/data/corpus\.idx does not exist"):
        build(config(data_path="/data/corpus"))
