"""Tokenizers: `NullTokenizer` (the data already holds ids) and `HuggingFaceTokenizer` (a local tokenizer.json).

Both expose the small interface the data pipeline and `generate` use: `vocab_size`, `eod`,
`tokenize(text) -> list[int]` and `detokenize(ids) -> str`. Finetuning data also reads `bos_id`,
`chat_template`, `template_variables`, `fingerprint` and, for chat masks, `tokenize_with_offsets`.

Hugging Face tokenizers are read with the `tokenizers` library from a local file only. A path
that does not exist is an error, never a download: runs must not depend on the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from megatron.bridge.utils.errors import ConfigError

if TYPE_CHECKING:
    from megatron.bridge.data.config import TokenizerConfig

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "ChatTemplateSource",
    "EOD_CANDIDATES",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "TEMPLATE_TOKEN_NAMES",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "Tokenizer",
    "build_tokenizer",
    "resolve_tokenizer_file",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers 5 saves a tokenizer's chat template (it takes priority over tokenizer_config.json's)."""
# Special tokens a chat template may name (`{{ bos_token }}`), as transformers passes them.
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
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


@dataclass(frozen=True)
class ChatTemplateSource:
    """A tokenizer's chat template (Jinja source) and the file it was read from."""

    text: str
    origin: str
    """The file, e.g. `.../chat_template.jinja`, or `.../tokenizer_config.json (chat_template)`."""


class NullTokenizer:
    """Ids in, ids out: text is a whitespace-separated list of integers; `eod = vocab_size - 1`.

    The end-of-document id is the last id of the vocabulary, as in the mock data. It has no
    beginning-of-sequence token and no chat template.
    """

    bos_id: int | None = None
    chat_template: ChatTemplateSource | None = None

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

    @property
    def template_variables(self) -> dict[str, str]:
        """Special-token strings for chat templates (none)."""
        return {}

    @property
    def fingerprint(self) -> str:
        """Identity of the tokenization, for cache keys."""
        return f"NullTokenizer(vocab_size={self._vocab_size})"


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer` read from a local `tokenizer.json` (or a folder holding one).

    The end-of-document token is `eod_token` when given, else the folder's `tokenizer_config.json`
    `eos_token` when there is one, else the first of `EOD_CANDIDATES` in the vocabulary. The
    beginning-of-sequence token is that file's `bos_token` (None when it names none). The chat template
    is `chat_template.jinja` beside tokenizer.json, else that file's `chat_template` (as transformers
    reads them).
    """

    def __init__(self, path: str | os.PathLike[str], eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = resolve_tokenizer_file(path)
        try:
            self._tokenizer = _RustTokenizer.from_file(self.path)
        except Exception as err:  # the Rust library raises a bare Exception on malformed JSON
            raise ConfigError(f"tokenizer.tokenizer_model: cannot read {self.path}: {err}") from err
        self._vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._config_path = os.path.join(os.path.dirname(self.path), TOKENIZER_CONFIG_FILE)
        self._config = _read_tokenizer_config(self._config_path)
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

    @cached_property
    def bos_id(self) -> int | None:
        """Id of the config's `bos_token`, or None when it names none that the vocabulary holds."""
        bos = self._special_token("bos_token")
        return None if bos is None else self._tokenizer.token_to_id(bos)

    @cached_property
    def template_variables(self) -> dict[str, str]:
        """The special-token strings a chat template may use (`bos_token`, `eos_token`, ...)."""
        names = {name: self._special_token(name) for name in TEMPLATE_TOKEN_NAMES}
        names["eos_token"] = self.eod_token
        return {name: token for name, token in names.items() if token is not None}

    @cached_property
    def chat_template(self) -> ChatTemplateSource | None:
        """The chat template: `chat_template.jinja` beside tokenizer.json, else the config's `chat_template`."""
        jinja_path = os.path.join(os.path.dirname(self.path), CHAT_TEMPLATE_FILE)
        if os.path.exists(jinja_path):
            try:
                with open(jinja_path, encoding="utf-8") as f:
                    return ChatTemplateSource(f.read(), jinja_path)
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"cannot read the chat template {jinja_path}: {err}") from err
        return _config_chat_template(self._config, f"{self._config_path} (chat_template)")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over tokenizer.json, tokenizer_config.json and the chat template: identity for cache keys."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            digest.update(f.read())
        digest.update(json.dumps(self._config, sort_keys=True).encode())
        template = self.chat_template
        digest.update(b"" if template is None else template.text.encode())
        digest.update(self.eod_token.encode())
        return digest.hexdigest()

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's `(start, end)` character span in it.

        Spans are untrimmed (a token " x" covers its space), so they tile the text: the post-processor,
        which adds nothing without special tokens but may trim spans, is left out.
        """
        encoding = self._offsets_tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    @cached_property
    def _offsets_tokenizer(self):
        from tokenizers import Tokenizer as _RustTokenizer

        copy = _RustTokenizer.from_str(self._tokenizer.to_str())
        copy.post_processor = None
        return copy

    def _special_token(self, name: str) -> str | None:
        token = self._config.get(name)
        if isinstance(token, dict):  # transformers writes AddedToken objects as dicts
            token = token.get("content")
        return token if isinstance(token, str) and self._tokenizer.token_to_id(token) is not None else None

    def _find_eod_token(self) -> str:
        eos = self._special_token("eos_token")
        if eos is not None:
            return eos
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        for candidate in EOD_CANDIDATES:
            if candidate in vocab:
                return candidate
        raise ConfigError(
            f"{self.path} has no end-of-document token: name one as eos_token in {TOKENIZER_CONFIG_FILE} "
            f"or add one of {', '.join(EOD_CANDIDATES)}"
        )


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _config_chat_template(config: dict, origin: str) -> ChatTemplateSource | None:
    """tokenizer_config.json's `chat_template`: a string, or transformers' list of named ones ("default" used)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{origin} must be a string (or a list of {{name, template}} with a 'default')")
    return ChatTemplateSource(template, origin)


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
