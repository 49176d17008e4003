"""Reading YAML that someone else may have written: bounded in size, nesting and expansion.

`yaml.safe_load` builds only plain values, but it still expands anchors and aliases: a few hundred
bytes of `&a [*b, *b, ...]` grow into gigabytes, and an error message that echoes the value grows with
them. Configs never need either, so every YAML this package reads goes through `safe_load` (text) or
`load_yaml_file` (a file), which refuse anchors, aliases, nesting deeper than `MAX_DEPTH` and files
larger than `MAX_YAML_BYTES`, and name the file in every error.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from megatron.bridge.utils.errors import UserError

__all__ = ["MAX_DEPTH", "MAX_YAML_BYTES", "YAMLInputError", "load_yaml_file", "safe_load"]

MAX_YAML_BYTES = 2**20
"""Largest YAML file read; a run's config is a few kilobytes (reading 1 MiB takes seconds)."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings accepted; a config nests three or four levels."""
_MAX_MESSAGE = 500


class YAMLInputError(UserError):
    """A YAML input refused: too large, not UTF-8, malformed, or using anchors, aliases or deep nesting."""


if yaml.__with_libyaml__:
    from yaml.cyaml import CParser

    class _SafeLoader(Composer, CParser, SafeConstructor, Resolver):
        """`yaml.SafeLoader` with libyaml's scanner and parser (several times faster) and Python's composer."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

else:  # PyYAML built without libyaml
    _SafeLoader = yaml.SafeLoader


class _BoundedLoader(_SafeLoader):
    """A safe loader that refuses anchors and aliases and counts the nesting depth while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise YAMLInputError(
                f"{_where(event)}: YAML {kind}{_cut(str(event.anchor), 40)} is refused (anchors and aliases "
                "can expand a small file into gigabytes); write the value out in full, or quote text starting "
                "with * or &"
            )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLInputError(f"{_where(event)}: nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_load(text: str) -> Any:
    """The plain value `text` holds (like `yaml.safe_load`, but bounded).

    Malformed YAML raises `yaml.YAMLError` as usual; anchors, aliases, deep nesting and unreadable
    values (an integer of thousands of digits) raise `YAMLInputError`.
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except UserError:
        raise
    except (ValueError, RecursionError) as err:  # a value the constructor cannot build
        raise YAMLInputError(_cut(f"unreadable value ({err})", _MAX_MESSAGE)) from err
    finally:
        loader.dispose()


def load_yaml_file(path: str | os.PathLike, *, label: str | None = None) -> Any:
    """The plain value the YAML file `path` holds; `YAMLInputError` starting with `label` (default: the path).

    The file is read as UTF-8, at most `MAX_YAML_BYTES`; a missing or unreadable file is an error too.
    """
    label = label or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise YAMLInputError(f"{label}: cannot read it ({err.strerror or err})") from err
    if len(data) > MAX_YAML_BYTES:
        raise YAMLInputError(f"{label}: larger than {MAX_YAML_BYTES // 2**20} MiB; a config is a few kilobytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YAMLInputError(f"{label}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from err
    try:
        return safe_load(text)
    except YAMLInputError as err:
        raise YAMLInputError(f"{label}: {err}") from err
    except yaml.YAMLError as err:
        raise YAMLInputError(f"{label}: not valid YAML ({_describe(err)})") from err


def _where(event: yaml.Event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _describe(err: yaml.YAMLError) -> str:
    # PyYAML's own message spans several lines and quotes the offending text; this is one short line.
    if isinstance(err, yaml.MarkedYAMLError):
        problem = _cut("; ".join(part for part in (err.context, err.problem) if part), _MAX_MESSAGE)
        mark = err.problem_mark or err.context_mark
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
    return _cut(" ".join(str(err).split()), _MAX_MESSAGE)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."
