"""Train a byte-level BPE tokenizer on local text files and save it as a Hugging Face tokenizer folder.

    python -m megatron.bridge.data.train_tokenizer --input a.jsonl b.txt --vocab-size 8192 --output runs/tok

Reads documents as preprocessing does (see `documents.py`), learns byte-level BPE merges (the
scheme of GPT-2 and Qwen: any byte sequence is representable, so nothing maps to "unknown"), and
writes `<output>/tokenizer.json` plus a `tokenizer_config.json` naming the end-of-document token
(`<|endoftext|>` by default), which `HuggingFaceTokenizer` and `transformers.AutoTokenizer`
both read.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence

from megatron.bridge.data.documents import TEXT_DOCUMENT_MODES, Document, check_inputs, iter_documents
from megatron.bridge.data.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from megatron.bridge.utils.errors import INTERRUPTED_STATUS, ConfigError, UserError, one_line

__all__ = ["DEFAULT_EOD_TOKEN", "MIN_VOCAB_SIZE", "build_parser", "main", "train_tokenizer"]

DEFAULT_EOD_TOKEN = "<|endoftext|>"
# 256 byte symbols plus the special token: the smallest vocabulary byte-level BPE can have.
MIN_VOCAB_SIZE = 257


def train_tokenizer(
    inputs: Sequence[str],
    *,
    vocab_size: int,
    output_dir: str,
    json_key: str = "text",
    text_documents: str = "file",
    min_frequency: int = 2,
    eod_token: str = DEFAULT_EOD_TOKEN,
    progress: bool = False,
) -> str:
    """Learn a `vocab_size`-token byte-level BPE from `inputs`; return the path of the saved tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size={vocab_size} is invalid: at least {MIN_VOCAB_SIZE} (256 bytes + {eod_token})")
    check_inputs(inputs, text_documents)  # before training starts, not from inside the Rust trainer
    documents = iter_documents(inputs, json_key=json_key, text_documents=text_documents)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
    )
    tokenizer.train_from_iterator(_texts(documents), trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, TOKENIZER_FILE)
    tokenizer.save(path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token, "bos_token": None,
        "unk_token": None, "pad_token": None, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(output_dir, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return path


def _texts(documents: Iterator[Document]) -> Iterator[str]:
    for document in documents:
        yield document.text


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m megatron.bridge.data.train_tokenizer`."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron.bridge.data.train_tokenizer",
        description="Train a byte-level BPE tokenizer on local files and save tokenizer.json in a folder.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="input files: .jsonl/.json/.ndjson, or plain text")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="tokens in the vocabulary, special token included")
    parser.add_argument("--output", required=True, help="folder to write tokenizer.json and tokenizer_config.json to")
    parser.add_argument("--json-key", default="text", help="key holding the text in each JSON line (default: text)")
    parser.add_argument("--text-documents", choices=TEXT_DOCUMENT_MODES, default="file",
                        help="plain text: one document per file (default) or per blank-line-separated paragraph")
    parser.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default: 2)")
    parser.add_argument("--eod-token", default=DEFAULT_EOD_TOKEN, help=f"end-of-document token ({DEFAULT_EOD_TOKEN})")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Run the command line; bad inputs exit with status 2 and a one-line message, Ctrl-C with 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = train_tokenizer(
            args.input, vocab_size=args.vocab_size, output_dir=args.output, json_key=args.json_key,
            text_documents=args.text_documents, min_frequency=args.min_frequency, eod_token=args.eod_token,
        )
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")
    except KeyboardInterrupt:
        parser.exit(INTERRUPTED_STATUS, f"{parser.prog}: interrupted\n")
    from megatron.bridge.data.tokenizer import HuggingFaceTokenizer

    # A small corpus may run out of merges before reaching --vocab-size: report the real size.
    print(f"wrote {path} ({HuggingFaceTokenizer(path).vocab_size} tokens, end of document {args.eod_token!r})")
    return path


if __name__ == "__main__":
    main()
