"""Fixtures for the finetuning-data tests: a small ChatML tokenizer made on the spot, and JSONL writers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from megatron.bridge.data import GPTSFTDatasetConfig, HuggingFaceTokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""A minimal ChatML template (Qwen's layout without its default system prompt), without generation markers."""

CHATML_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The same ChatML with `{% generation %}` around each answer and its end-of-turn token."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Say hello to the world. Hello, world! How are you today? I am fine, thank you.",
    "user assistant system: count one two three four five six seven eight nine ten.",
]


def make_tokenizer_folder(folder: Path, *, chat_template: str | None = CHATML, bos: bool = False) -> Path:
    """A byte-level BPE with ChatML's special tokens, its tokenizer_config.json and chat_template.jinja."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = SPECIAL_TOKENS + (["<s>"] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "bos_token": "<s>" if bos else None, "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
    return folder


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory) -> Path:
    """Folder of the ChatML tokenizer (template without generation markers)."""
    return make_tokenizer_folder(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="session")
def chatml(chatml_dir) -> HuggingFaceTokenizer:
    """The ChatML tokenizer (read-only: tests share it)."""
    return HuggingFaceTokenizer(chatml_dir)


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    """`rows` as JSON lines (strings are written as they are, for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


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
