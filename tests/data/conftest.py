"""Fixtures for the data tests: a small trained tokenizer, a small text corpus, indexed datasets from token lists."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from megatron.bridge.data.indexed_dataset import IndexedDatasetWriter
from megatron.bridge.data.train_tokenizer import train_tokenizer

# A handful of standard-library modules: real text, on every machine, no download.
CORPUS_MODULES = ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py", "heapq.py",
                  "keyword.py", "linecache.py", "numbers.py", "opcode.py", "operator.py", "shlex.py",
                  "stat.py", "string.py", "textwrap.py", "this.py", "token.py", "types.py", "uu.py")
TOKENIZER_VOCAB = 400


def corpus_files() -> list[str]:
    """Paths of the corpus modules that exist in this Python's standard library."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, name) for name in CORPUS_MODULES if os.path.isfile(os.path.join(stdlib, name))]
    assert len(files) >= 10, "the standard library should hold most of these modules"
    return files


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """The corpus files (plain text, one document per file)."""
    return corpus_files()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer of 400 ids trained on the corpus (trained once per test session)."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_files(), vocab_size=TOKENIZER_VOCAB, output_dir=str(out))
    return str(out)


@pytest.fixture
def write_dataset(tmp_path) -> Callable[..., str]:
    """`write_dataset(documents, name="ds", dtype=np.uint16)` -> prefix of a new indexed dataset in tmp_path."""

    def write(documents: Sequence[Sequence[int]], name: str = "ds", dtype: type[np.generic] = np.uint16) -> str:
        prefix = str(Path(tmp_path) / name)
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for document in documents:
                writer.add_document(np.asarray(document))
        return prefix

    return write
