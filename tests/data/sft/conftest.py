"""Fixtures for the finetuning-data tests: the ChatML tokenizer (made once) and a dataset-folder factory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sft_helpers import make_tokenizer_folder, write_jsonl

from megatron.bridge.data import GPTSFTDatasetConfig, HuggingFaceTokenizer


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory) -> Path:
    """Folder of the ChatML tokenizer (template without generation markers)."""
    return make_tokenizer_folder(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="session")
def chatml(chatml_dir) -> HuggingFaceTokenizer:
    """The ChatML tokenizer (read-only: tests share it)."""
    return HuggingFaceTokenizer(chatml_dir)


@pytest.fixture
def dataset(tmp_path) -> Callable[..., GPTSFTDatasetConfig]:
    """`dataset(train_rows, valid=None, test=None, **fields)`: the rows written to tmp_path/data, and its config."""

    def make(train: Sequence[Any], valid: Sequence[Any] | None = None, test: Sequence[Any] | None = None,
             **fields: Any) -> GPTSFTDatasetConfig:
        root = tmp_path / "data"
        write_jsonl(root / "training.jsonl", train)
        if valid is not None:
            write_jsonl(root / "validation.jsonl", valid)
        if test is not None:
            write_jsonl(root / "test.jsonl", test)
        fields.setdefault("seq_length", 64)
        fields.setdefault("do_validation", valid is not None)
        fields.setdefault("do_test", test is not None)
        return GPTSFTDatasetConfig(dataset_root=root, **fields)

    return make
