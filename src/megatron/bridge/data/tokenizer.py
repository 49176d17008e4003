"""Tokenizers: `NullTokenizer` (the data already holds ids) and `HuggingFaceTokenizer` (a local tokenizer.json).

Both expose the small interface the data pipeline and `generate` use: `vocab_size`, `eod`,
`tokenize(text) -> list[int]` and `detokenize(ids) -> str`.

Hugging Face tokenizers are read with the `tokenizers` library from a local file only. A path
that does not exist is an error, never a download: runs must not depend on the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from megatron.bridge.utils.errors import ConfigError

if TYPE_CHECKING:
    from megatron.bridge.training.config import TokenizerConfig

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# End-of-document tokens of common tokenizer families, tried in this order when the folder's
# tokenizer_config.json does not name an `eos_token`.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (every id is below this)."""
        ...

    @property
    def eod(self) -> int:
        """Id of the end-of-document token appended after every document."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document token)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        ...


class NullTokenizer:
    """Ids in, ids out: text is a whitespace-separated list of integers; `eod = vocab_size - 1`.

    The end-of-document id is the last id of the vocabulary, as in the mock data.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ConfigError(f"tokenizer.vocab_size={vocab_size!r} is invalid: at least 2 for a NullTokenizer")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(token) for token in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer` read from a local `tokenizer.json` (or a folder holding one).

    The end-of-document token is the folder's `tokenizer_config.json` `eos_token` when there is
    one, else the first of `EOD_CANDIDATES` in the vocabulary, else `eod_token` when given.
    """

    def __init__(self, path: str | os.PathLike[str], eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = resolve_tokenizer_file(path)
        try:
            self._tokenizer = _RustTokenizer.from_file(self.path)
        except Exception as err:  # the Rust library raises a bare Exception on malformed JSON
            raise ConfigError(f"tokenizer.tokenizer_model: cannot read {self.path}: {err}") from err
        self._vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_token = eod_token or self._find_eod_token()
        eod = self._tokenizer.token_to_id(self.eod_token)
        if eod is None:
            raise ConfigError(f"{self.path} has no token {self.eod_token!r} to end documents with")
        self._eod = eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (the Rust library may use several threads)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _find_eod_token(self) -> str:
        config_path = os.path.join(os.path.dirname(self.path), TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):  # transformers writes AddedToken objects as dicts
                eos = eos.get("content")
            if isinstance(eos, str) and self._tokenizer.token_to_id(eos) is not None:
                return eos
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        for candidate in EOD_CANDIDATES:
            if candidate in vocab:
                return candidate
        raise ConfigError(
            f"{self.path} has no end-of-document token: name one as eos_token in {TOKENIZER_CONFIG_FILE} "
            f"or add one of {', '.join(EOD_CANDIDATES)}"
        )


def resolve_tokenizer_file(path: str | os.PathLike[str]) -> str:
    """The tokenizer.json that `path` names: the file itself, or `tokenizer.json` inside a folder."""
    path = os.fspath(path)
    candidate = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        what = f"{path} holds no {TOKENIZER_FILE}" if os.path.isdir(path) else f"{path} does not exist"
        raise ConfigError(
            f"tokenizer.tokenizer_model={path!r} is invalid: {what}; give a local {TOKENIZER_FILE} or a folder "
            "holding one (tokenizers are never downloaded; train one with "
            "python -m megatron.bridge.data.train_tokenizer)"
        )
    return candidate


def build_tokenizer(config: TokenizerConfig) -> NullTokenizer | HuggingFaceTokenizer:
    """The tokenizer `config` describes."""
    if config.tokenizer_type == "NullTokenizer":
        if config.vocab_size is None:
            raise ConfigError("tokenizer.vocab_size=None is invalid: a NullTokenizer needs a vocabulary size")
        return NullTokenizer(config.vocab_size)
    if config.tokenizer_type == "HuggingFaceTokenizer":
        if config.tokenizer_model is None:
            raise ConfigError(
                "tokenizer.tokenizer_model=None is invalid: a HuggingFaceTokenizer needs a local tokenizer.json "
                "or a folder holding one"
            )
        return HuggingFaceTokenizer(config.tokenizer_model)
    raise ConfigError(
        f"tokenizer.tokenizer_type={config.tokenizer_type!r} is invalid: choose one of NullTokenizer, "
        "HuggingFaceTokenizer"
    )
