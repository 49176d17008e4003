"""Chat templates rendered as `transformers` renders them, and the character spans of assistant turns.

The environment matches transformers' (`chat_template_utils.py`): a sandbox that cannot change its
inputs, `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception(msg)`,
`strftime_now(fmt)`, a `tojson` that keeps non-ASCII text, and the `{% generation %}` tag, whose
rendered body marks text to train on. Templates are other people's code: the sandbox is the point.

Where the loss goes (`assistant_spans`):
  - a template with `{% generation %}` blocks: exactly the text of those blocks;
  - any other template: for assistant message `i`, the text between the rendering of messages `[:i]`
    with the generation prompt and the rendering of messages `[:i + 1]`, less trailing whitespace
    (for ChatML: the answer and `<|im_end|>`, not the header before it nor the newline after it).
    Both renderings must be prefixes of the whole conversation's; if a template renders an earlier
    turn differently once later turns exist, the spans cannot be found exactly and that is an error,
    never a silent full mask.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

__all__ = ["ChatTemplate", "Span", "SpanError"]

Span = tuple[int, int]
"""A `[start, end)` character range of a rendered conversation."""

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class SpanError(ValueError):
    """The assistant spans of a conversation cannot be found exactly (the caller names the data line)."""


class _Rendering:
    """What the `{% generation %}` tag needs while one rendering runs: output so far, spans seen."""

    def __init__(self) -> None:
        self.length = 0
        self.blocks: list[tuple[int, str]] = []


_active: ContextVar[_Rendering | None] = ContextVar("chat_template_rendering", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and records where it went."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        rendering = _active.get()
        if rendering is not None:
            rendering.blocks.append((rendering.length, text))
        return text


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, which would reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace takes `self` this way
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore names, got {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


class ChatTemplate:
    """A compiled chat template; `render` and `assistant_spans` apply it to conversations.

    `variables` are passed to every rendering besides `messages` and `add_generation_prompt`
    (the tokenizer's special tokens: `bos_token`, `eos_token`, ...). A template that does not compile
    is a `ValueError` naming `origin` and the template line.
    """

    def __init__(self, source: str, *, origin: str, variables: dict[str, Any] | None = None) -> None:
        self.origin = origin
        self.variables = dict(variables or {})
        self.has_generation_markers = bool(_GENERATION_TAG.search(source))
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ValueError(f"the chat template {origin} does not compile: line {err.lineno}: {err.message}") from err

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it (`jinja2` errors propagate)."""
        text, _ = self._render(messages, add_generation_prompt)
        return text

    def assistant_spans(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[Span]]:
        """The rendered conversation and the span of each assistant message, in order (see the module doc).

        Raises:
            SpanError: when the spans cannot be found exactly.
        """
        text, blocks = self._render(messages, add_generation_prompt=False)
        num_assistant = sum(1 for m in messages if m["role"] == "assistant")
        if self.has_generation_markers:
            if len(blocks) != num_assistant:
                raise SpanError(f"the chat template {self.origin} marked {len(blocks)} {{% generation %}} blocks "
                                f"for {num_assistant} assistant messages")
            return text, blocks
        return text, [self._span_by_prefixes(messages, i, text) for i, m in enumerate(messages)
                      if m["role"] == "assistant"]

    def _span_by_prefixes(self, messages: Sequence[dict[str, Any]], index: int, text: str) -> Span:
        before, _ = self._render(messages[:index], add_generation_prompt=True)
        through, _ = self._render(messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise SpanError(
                f"the chat template {self.origin} renders the conversation up to message {index} (an assistant turn) "
                "differently from the start of the whole conversation, so its answer cannot be located exactly; "
                "mark the answers with {% generation %} ... {% endgeneration %} in the template"
            )
        end = len(through.rstrip())
        if end <= len(before):
            raise SpanError(f"the chat template {self.origin} renders assistant message {index} as nothing")
        return len(before), end

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> tuple[str, list[Span]]:
        with _tracking() as rendering:
            pieces = []
            context = dict(self.variables, messages=list(messages), tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt)
            for piece in self._template.generate(**context):
                pieces.append(piece)
                rendering.length += len(piece)
        text = "".join(pieces)
        spans = []
        for start, body in rendering.blocks:
            # A block rendered inside a macro or a `set` block is buffered, so its recorded offset is wrong.
            if text[start: start + len(body)] != body:
                raise SpanError(f"the chat template {self.origin} has a {{% generation %}} block whose position "
                                "in the output cannot be tracked (inside a macro or a set block?)")
            spans.append((start, start + len(body)))
        return text, spans


@contextmanager
def _tracking() -> Iterator[_Rendering]:
    rendering = _Rendering()
    token = _active.set(rendering)
    try:
        yield rendering
    finally:
        _active.reset(token)
