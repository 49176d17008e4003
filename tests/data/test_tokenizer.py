"""Tokenizers: the trained BPE, loading it without a network, and the model's vocabulary following it."""

from __future__ import annotations

import json
import os

import pytest

from megatron.bridge.data.tokenizer import HuggingFaceTokenizer, NullTokenizer, build_tokenizer
from megatron.bridge.data.train_tokenizer import main as train_tokenizer_main
from megatron.bridge.training.config import TokenizerConfig
from megatron.bridge.training.pretrain import _resolve_vocab_size

TOKENIZER_VOCAB = 400  # the `tokenizer_dir` fixture's size (tests/data/conftest.py)


def test_trained_tokenizer_round_trips_text(tokenizer_dir):
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]
    tokenizer = HuggingFaceTokenizer(tokenizer_dir)
    assert tokenizer.vocab_size == TOKENIZER_VOCAB
    assert tokenizer.eod_token == "<|endoftext|>" and tokenizer.eod == 0  # special tokens come first
    text = "def f(x):\n    return x + 1  # ünïcode too\n"
    ids = tokenizer.tokenize(text)
    assert len(ids) < len(text) and max(ids) < TOKENIZER_VOCAB and tokenizer.eod not in ids
    assert tokenizer.detokenize(ids) == text
    # A file path works as well as the folder.
    assert HuggingFaceTokenizer(os.path.join(tokenizer_dir, "tokenizer.json")).tokenize(text) == ids


def test_transformers_reads_the_saved_folder(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = HuggingFaceTokenizer(tokenizer_dir)
    assert hf.eos_token == "<|endoftext|>" and hf("import os\n")["input_ids"] == ours.tokenize("import os\n")


@pytest.mark.parametrize("path", ["/nonexistent/Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"])
def test_missing_tokenizer_is_an_error_never_a_download(path):
    config = TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=path)
    with pytest.raises(ValueError, match=r"tokenizer.tokenizer_model=.* does not exist.*never downloaded"):
        config.validate()
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer(config)


def test_folder_without_tokenizer_json_is_named(tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        HuggingFaceTokenizer(tmp_path)


def test_eos_token_comes_from_tokenizer_config(tokenizer_dir, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        (folder / "tokenizer.json").write_text(f.read(), encoding="utf-8")
    # No tokenizer_config.json: the <|endoftext|> token is found among the known names.
    assert HuggingFaceTokenizer(folder).eod_token == "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert HuggingFaceTokenizer(folder).eod == 0


def test_null_tokenizer():
    tokenizer = NullTokenizer(128)
    assert tokenizer.vocab_size == 128 and tokenizer.eod == 127
    assert tokenizer.tokenize("1 2  30") == [1, 2, 30] and tokenizer.detokenize([1, 2]) == "1 2"
    with pytest.raises(ValueError, match="tokenizer.vocab_size=None"):
        build_tokenizer(TokenizerConfig(tokenizer_type="NullTokenizer"))


def test_hf_tokenizer_config_validation(tokenizer_dir):
    TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir).validate()
    with pytest.raises(ValueError, match="tokenizer.tokenizer_model=None is invalid"):
        TokenizerConfig(tokenizer_type="HuggingFaceTokenizer").validate()


def test_model_vocabulary_follows_the_real_tokenizer(tiny_config, tokenizer_dir):
    config = tiny_config(tokenizer__tokenizer_type="HuggingFaceTokenizer", tokenizer__tokenizer_model=tokenizer_dir)
    assert config.tokenizer.vocab_size == 128  # left over from the NullTokenizer recipe
    _resolve_vocab_size(config)
    assert config.tokenizer.vocab_size == TOKENIZER_VOCAB and config.model.vocab_size == TOKENIZER_VOCAB
    assert config.model.padded_vocab_size == 512  # rounded up to make_vocab_size_divisible_by=128
    config.validate()


def test_train_tokenizer_command_rejects_a_tiny_vocabulary(tmp_path, capsys):
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world\n")
    with pytest.raises(SystemExit) as info:
        train_tokenizer_main(["--input", str(corpus), "--vocab-size", "100", "--output", str(tmp_path / "tok")])
    assert info.value.code == 2 and "vocab_size=100 is invalid: at least 257" in capsys.readouterr().err
