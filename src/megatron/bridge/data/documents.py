"""Reading documents from local text files, for preprocessing and tokenizer training.

Two kinds of input, told apart by the file name:

- JSON lines (`.jsonl`, `.json`, `.ndjson`): one JSON object per line, the document is the value
  of `json_key` (default "text"); blank lines are skipped.
- Anything else is plain UTF-8 text: with `text_documents="file"` (the default) the whole file is
  one document; with `text_documents="paragraph"` every blank-line-separated paragraph is one.

Empty documents are skipped: they would add nothing but an end-of-document token.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron.bridge.data.indexed_dataset import DatasetError

__all__ = [
    "Document",
    "JSON_SUFFIXES",
    "TEXT_DOCUMENT_MODES",
    "check_inputs",
    "is_json_lines",
    "iter_documents",
    "total_bytes",
]

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_DOCUMENT_MODES = ("file", "paragraph")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


@dataclass(frozen=True)
class Document:
    """One document's text and the input bytes it came from (for progress bars)."""

    text: str
    num_bytes: int


def is_json_lines(path: str) -> bool:
    """True for the file names read as JSON lines."""
    return path.lower().endswith(JSON_SUFFIXES)


def check_inputs(paths: Sequence[str], text_documents: str = "file") -> None:
    """DatasetError naming the first input that does not exist, or an unknown `text_documents`."""
    if not paths:
        raise DatasetError("no input files given")
    if text_documents not in TEXT_DOCUMENT_MODES:
        choices = ", ".join(TEXT_DOCUMENT_MODES)
        raise DatasetError(f"text_documents={text_documents!r} is invalid: choose one of {choices}")
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetError(f"input file {path} does not exist")


def total_bytes(paths: Sequence[str]) -> int:
    """The summed size of the input files."""
    return sum(os.path.getsize(path) for path in paths)


def iter_documents(paths: Sequence[str], *, json_key: str = "text", text_documents: str = "file") -> Iterator[Document]:
    """Every non-empty document of `paths`, in order."""
    check_inputs(paths, text_documents)
    for path in paths:
        if is_json_lines(path):
            yield from _json_documents(path, json_key)
        else:
            yield from _text_documents(path, text_documents)


def _json_documents(path: str, json_key: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{line_number}: not a JSON object ({err.msg})") from err
            if not isinstance(record, dict) or json_key not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise DatasetError(
                    f"{path}:{line_number}: no key {json_key!r} (found: {keys}); choose one with --json-key"
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise DatasetError(f"{path}:{line_number}: {json_key!r} holds {type(text).__name__}, not text")
            if text:
                yield Document(text, len(line))


def _text_documents(path: str, text_documents: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if text_documents == "file":
        if text.strip():
            yield Document(text, len(raw))
        return
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    for paragraph in paragraphs:
        yield Document(paragraph.strip("\n"), len(paragraph.encode("utf-8")))
