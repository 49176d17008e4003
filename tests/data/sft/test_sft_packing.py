"""Offline packing: the first-fit algorithms, pack contents, the cache (reuse, invalidation, no pickle, atomic)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from sft_helpers import CHATML_GENERATION, make_tokenizer_folder

from megatron.bridge.data import (
    HuggingFaceTokenizer,
    NullTokenizer,
    PackedSequenceSpecs,
    PromptCompletionSFTPreprocessingConfig,
    build_sft_data_iterators,
)
from megatron.bridge.data.sft.builder import build_sft_split
from megatron.bridge.data.sft.packing import first_fit, pack_examples

TOKENIZER = NullTokenizer(100)


def reference_first_fit(lengths, capacity, order):
    packs, free = [], []
    for example in order:
        target = next((b for b, room in enumerate(free) if room >= lengths[example]), None)
        if target is None:
            packs.append([]), free.append(capacity)
            target = len(packs) - 1
        packs[target].append(int(example))
        free[target] -= lengths[example]
    return packs


def test_first_fit_small_cases():
    assert first_fit([5, 4, 3, 2, 1], 6, order=range(5)) == [[0, 4], [1, 3], [2]]
    assert pack_examples([1, 5, 2, 4, 3], 6, algorithm="first_fit_decreasing", seed=0) == [[1, 0], [3, 2], [4]]
    assert first_fit([6, 6, 1], 6, order=range(3)) == [[0], [1], [2]]


@pytest.mark.parametrize("algorithm", ["first_fit_shuffle", "first_fit_decreasing"])
def test_first_fit_matches_the_plain_definition(algorithm):
    lengths = np.random.default_rng(0).integers(1, 33, size=300)
    packs = pack_examples(lengths, 32, algorithm=algorithm, seed=5)
    order = (np.argsort(-lengths, kind="stable") if algorithm == "first_fit_decreasing"
             else np.random.default_rng(5).permutation(300))
    assert packs == reference_first_fit(lengths, 32, order)
    assert sorted(e for pack in packs for e in pack) == list(range(300))
    assert all(sum(lengths[e] for e in pack) <= 32 for pack in packs)
    if algorithm == "first_fit_shuffle":
        assert pack_examples(lengths, 32, algorithm=algorithm, seed=6) != packs


def packed_config(dataset, rows, **fields):
    specs = fields.pop("specs", PackedSequenceSpecs(packed_sequence_size=16))
    fields.setdefault("preprocessing", PromptCompletionSFTPreprocessingConfig(separator=" "))
    return dataset(rows, seq_length=16, enable_offline_packing=True, offline_packing_specs=specs, **fields)


ROWS = [{"input": "1 2", "output": "3 4 5"}, {"input": "6", "output": "7"}, {"input": "8 9 10", "output": "11 12"},
        {"input": "13", "output": "14 15 16 17 18 19 20"}]


def test_packs_hold_every_example_with_restarting_positions_and_boundaries(dataset):
    config = packed_config(dataset, ROWS, specs=PackedSequenceSpecs(16, packing_algorithm="first_fit_decreasing"))
    data, stats = build_sft_data_iterators(config, TOKENIZER, micro_batch_size=2, global_batch_size=2,
                                           train_samples=2, valid_samples=0, test_samples=0)
    batch = next(data.train)
    # Positions per example (ids - 1): 5, 2, 5, 8 -> first fit decreasing: [8, 5, 2] and [5], padded to 16.
    assert stats.splits["train"].rows == 2 and batch["tokens"].shape == (2, 16)
    rows_by_size = sorted(range(2), key=lambda r: -int(batch["loss_mask"][r].sum()))
    full, single = rows_by_size
    assert batch["position_ids"][full].tolist() == [*range(8), *range(5), *range(2), 0]
    assert batch["position_ids"][single].tolist() == [*range(5), *range(11)]
    offset = 16 * single
    expected_single = [offset, offset + 5, offset + 16]
    expected_full = [16 * full + b for b in (0, 8, 13, 15, 16)]
    assert batch["cu_seqlens"].tolist() == sorted({0, *expected_full, *expected_single})
    assert int(batch["max_seqlen"]) == 11
    # No label crosses into the next example: each example's last label is its own eos.
    assert batch["labels"][full].tolist()[:15] == [14, 15, 16, 17, 18, 19, 20, 99, 2, 3, 4, 5, 99, 7, 99]
    # Label 2 is the second example's prompt; the last position is the pad.
    assert batch["loss_mask"][full].tolist() == [1] * 8 + [0, 1, 1, 1, 1] + [1, 1] + [0]
    assert stats.splits["train"].packing_efficiency == pytest.approx((8 + 5 + 2 + 5) / 32)


def test_the_cache_is_reused_and_loads_without_pickle(dataset, monkeypatch):
    config = packed_config(dataset, ROWS)
    first = build_sft_split(config, TOKENIZER, "train")
    assert not first.stats.cache_reused and os.path.isfile(first.stats.cache_file)
    stamp = os.stat(first.stats.cache_file).st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the cache must load without unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    again = build_sft_split(config, TOKENIZER, "train")
    assert again.stats.cache_reused and again.stats.cache_file == first.stats.cache_file
    assert os.stat(first.stats.cache_file).st_mtime_ns == stamp
    for name in ("ids", "loss_mask", "example_offsets", "row_offsets"):
        assert np.array_equal(getattr(again.rows, name), getattr(first.rows, name))
    assert again.stats.packing_efficiency == first.stats.packing_efficiency
    assert sorted(os.listdir(config.dataset_root / "packed")) == [os.path.basename(first.stats.cache_file)]


def test_the_cache_key_follows_its_inputs(dataset, tmp_path):
    config = packed_config(dataset, ROWS)
    base = build_sft_split(config, TOKENIZER, "train").stats.cache_file
    changes = {
        "seed": lambda c: setattr(c, "seed", 7),
        "algorithm": lambda c: setattr(c.offline_packing_specs, "packing_algorithm", "first_fit_decreasing"),
        "pack size": lambda c: setattr(c.offline_packing_specs, "packed_sequence_size", 12),
        "preprocessing": lambda c: setattr(c.preprocessing, "loss_mode", "full"),
        "max samples": lambda c: setattr(c, "max_train_samples", 2),
    }
    files = {base}
    for name, change in changes.items():
        changed = packed_config(dataset, ROWS)
        change(changed)
        built = build_sft_split(changed, TOKENIZER, "train")
        assert not built.stats.cache_reused and built.stats.cache_file not in files, name
        files.add(built.stats.cache_file)
    assert not build_sft_split(config, NullTokenizer(101), "train").stats.cache_reused
    edited = packed_config(dataset, [*ROWS[:3], {"input": "13", "output": "14"}])  # rewrites training.jsonl
    assert not build_sft_split(edited, TOKENIZER, "train").stats.cache_reused


def test_the_cache_key_follows_the_chat_template(dataset, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "hello"}]}] * 3
    config = dataset(rows, seq_length=32, enable_offline_packing=True, offline_packing_specs=PackedSequenceSpecs(32))
    plain = build_sft_split(config, HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "a")), "train")
    marked_tokenizer = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "b", chat_template=CHATML_GENERATION))
    marked = build_sft_split(config, marked_tokenizer, "train")
    assert not marked.stats.cache_reused and marked.stats.cache_file != plain.stats.cache_file


def test_a_damaged_cache_file_is_rebuilt(dataset):
    config = packed_config(dataset, ROWS)
    built = build_sft_split(config, TOKENIZER, "train")
    with open(built.stats.cache_file, "r+b") as f:
        f.truncate(20)
    rebuilt = build_sft_split(config, TOKENIZER, "train")
    assert not rebuilt.stats.cache_reused and np.array_equal(rebuilt.rows.ids, built.rows.ids)
    assert build_sft_split(config, TOKENIZER, "train").stats.cache_reused


def test_a_failed_write_leaves_no_file(dataset, monkeypatch):
    config = packed_config(dataset, ROWS)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_sft_split(config, TOKENIZER, "train")
    assert os.listdir(config.dataset_root / "packed") == []


def test_cache_dir_and_unpacked_test_split(dataset, tmp_path):
    config = packed_config(dataset, ROWS, test=ROWS, do_test=True,
                           specs=PackedSequenceSpecs(16, cache_dir=str(tmp_path / "cache")))
    data, stats = build_sft_data_iterators(config, TOKENIZER, micro_batch_size=1, global_batch_size=1,
                                           train_samples=1, valid_samples=0, test_samples=1)
    assert os.path.dirname(stats.splits["train"].cache_file) == str(tmp_path / "cache")
    assert stats.splits["test"].pack_size is None and "cu_seqlens" not in next(data.test)
    assert "packs of 16, packing is" in stats.log_lines()[0] and "4 examples read" in stats.log_lines()[1]
