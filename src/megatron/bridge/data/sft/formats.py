"""Finetuning rows: reading JSONL lines, recognising their format, and checking each row.

Four formats, told apart by their keys (other keys are ignored):

| format              | keys                                           |
| ------------------- | ---------------------------------------------- |
| `input/output`      | `input`, `output` (strings; SQuAD-style)       |
| `prompt/completion` | `prompt`, `completion` (strings)               |
| `messages`          | `messages`: list of `{"role", "content"}`      |
| `conversations`     | `conversations`: list of `{"from", "value"}` (ShareGPT; optional top-level `system`) |

A file has one format, set by its first line. Every problem is an `SFTDataError` naming the file and
the 1-based line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.bridge.utils.errors import UserError

__all__ = [
    "CONVERSATIONS",
    "FORMATS",
    "INPUT_OUTPUT",
    "Location",
    "MESSAGES",
    "Message",
    "PROMPT_COMPLETION",
    "PromptCompletion",
    "Row",
    "RowFormat",
    "SFTDataError",
    "SHAREGPT_ROLES",
    "detect_format",
    "parse_row",
    "read_jsonl",
]

Message = dict[str, Any]
"""One chat message: `role` and `content` strings, plus whatever else the template reads."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""ShareGPT `from` values (lower-cased) and the chat role each becomes."""


class SFTDataError(UserError):
    """A bad line in a finetuning data file; the message starts with `<file>:<line>:`."""


@dataclass(frozen=True)
class Location:
    """A line of a data file, as error messages name it."""

    path: Path
    line: int
    """1-based."""

    def error(self, problem: str) -> SFTDataError:
        """An `SFTDataError` about this line."""
        return SFTDataError(f"{self.path}:{self.line}: {problem}")


@dataclass(frozen=True)
class RowFormat:
    """One of the row formats: its name, its keys, and whether rows are conversations."""

    name: str
    keys: tuple[str, ...]
    chat: bool


INPUT_OUTPUT = RowFormat("input/output", ("input", "output"), chat=False)
PROMPT_COMPLETION = RowFormat("prompt/completion", ("prompt", "completion"), chat=False)
MESSAGES = RowFormat("messages", ("messages",), chat=True)
CONVERSATIONS = RowFormat("conversations", ("conversations",), chat=True)
FORMATS = (INPUT_OUTPUT, PROMPT_COMPLETION, MESSAGES, CONVERSATIONS)


@dataclass(frozen=True)
class PromptCompletion:
    """A prompt and its answer."""

    prompt: str
    completion: str


Row = PromptCompletion | list[Message]
"""A checked row: a prompt and answer, or a conversation."""


def _describe_formats() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.keys)})" for f in FORMATS)


def detect_format(row: dict[str, Any], where: Location) -> RowFormat:
    """The one format whose keys `row` has."""
    matches = [f for f in FORMATS if all(key in row for key in f.keys)]
    if len(matches) == 1:
        return matches[0]
    keys = ", ".join(sorted(row)) or "none"
    if not matches:
        raise where.error(f"keys [{keys}] match no finetuning format; expected one of: {_describe_formats()}")
    names = " and ".join(f.name for f in matches)
    raise where.error(f"keys [{keys}] match several formats ({names}); keep the keys of exactly one")


def read_jsonl(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Each non-blank line of `path` as a JSON object, with its location."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise SFTDataError(f"cannot read {path}: {err}") from err
    with f:
        line_number = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as err:
                raise Location(path, line_number + 1).error(f"not UTF-8 text ({err})") from err
            if not line:
                return
            line_number += 1
            if not line.strip():
                continue
            where = Location(path, line_number)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise where.error(f"not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise where.error(f"expected a JSON object, got {_type_name(row)}")
            yield where, row


def parse_row(row: dict[str, Any], fmt: RowFormat, where: Location, *, file_format_line: int) -> Row:
    """Check `row` against its file's format `fmt` (set by line `file_format_line`) and normalise it."""
    missing = [key for key in fmt.keys if key not in row]
    if missing:
        looks_like = [f.name for f in FORMATS if f is not fmt and all(key in row for key in f.keys)]
        hint = f"; this line looks like {looks_like[0]}, but a file holds one format" if looks_like else ""
        raise where.error(
            f"missing key {missing[0]!r}: line {file_format_line} set the file's format to {fmt.name} "
            f"(keys {', '.join(fmt.keys)}){hint}"
        )
    if fmt is INPUT_OUTPUT or fmt is PROMPT_COMPLETION:
        prompt_key, answer_key = fmt.keys
        prompt = _string(row, prompt_key, where)
        answer = _string(row, answer_key, where)
        if not answer.strip():
            raise where.error(f"{answer_key!r} is empty: every example needs an answer to learn")
        return PromptCompletion(prompt, answer)
    if fmt is MESSAGES:
        return _messages(row["messages"], where)
    return _sharegpt(row, where)


def _messages(messages: Any, where: Location) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise where.error(f"'messages' must be a non-empty list of messages, got {_type_name(messages)}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise where.error(
                f"messages[{index}] must be an object with 'role' and 'content', got {_type_name(message)}"
            )
        role = _string(message, "role", where, what=f"messages[{index}]")
        _string(message, "content", where, what=f"messages[{index}]")
        if not role:
            raise where.error(f"messages[{index}].role is empty")
        out.append(dict(message))
    return _checked_conversation(out, where, "messages", first=0)


def _sharegpt(row: dict[str, Any], where: Location) -> list[Message]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise where.error(f"'conversations' must be a non-empty list of turns, got {_type_name(turns)}")
    messages: list[Message] = []
    if "system" in row:
        messages.append({"role": "system", "content": _string(row, "system", where)})
    for index, turn in enumerate(turns):
        what = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise where.error(f"{what} must be an object with 'from' and 'value', got {_type_name(turn)}")
        speaker = _string(turn, "from", where, what=what)
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise where.error(f"{what}.from={speaker!r} is not a known speaker: use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": _string(turn, "value", where, what=what)})
    # A top-level system prompt is message 0 but no entry of `conversations`.
    return _checked_conversation(messages, where, "conversations", first=len(messages) - len(turns))


def _checked_conversation(messages: list[Message], where: Location, key: str, *, first: int) -> list[Message]:
    """`messages` after checking its answers; `messages[first]` is `key[0]` in the file."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise where.error(f"the conversation in {key!r} has no assistant message: there is nothing to learn")
    for i in assistant:
        if not messages[i]["content"].strip():
            raise where.error(f"{key}[{i - first}] is an assistant message with empty content")
    return messages


def _string(mapping: dict[str, Any], key: str, where: Location, *, what: str = "") -> str:
    name = f"{what}.{key}" if what else repr(key)
    if key not in mapping:
        raise where.error(f"{what or 'the row'} has no {key!r}")
    value = mapping[key]
    if not isinstance(value, str):
        raise where.error(f"{name} must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
