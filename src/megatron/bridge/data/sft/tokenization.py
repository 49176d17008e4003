"""Rows to token ids and loss masks, with truncation.

An example is `ids` (int32) and `loss_mask` (bool, aligned with `ids`): `loss_mask[i]` says whether token
`i` is a target, i.e. whether predicting it from `ids[:i]` counts in the loss. Token 0 is never a
target (nothing predicts it). An example holds at most `max_positions + 1` ids, so its inputs
(`ids[:-1]`) fill at most `max_positions` model positions.

Truncation of an over-long example:
  - prompt/completion: the prompt is cut first, at its end (`truncation_method="right"`) or its
    beginning (`"left"`); only when the answer alone exceeds the budget is it cut, at its end (its
    end-of-sequence token then goes too: the answer did not end there);
  - chat: the rendered conversation is cut at its end.
An example left with no target is dropped. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np

from megatron.bridge.data.sft.chat_template import ChatTemplate, Span, SpanError
from megatron.bridge.data.sft.config import (
    ChatSFTPreprocessingConfig,
    PromptCompletionSFTPreprocessingConfig,
    SFTPreprocessingConfig,
)
from megatron.bridge.data.sft.formats import Location, Message, PromptCompletion, Row, RowFormat, SFTDataError
from megatron.bridge.utils.errors import config_error

__all__ = ["ExampleTokenizer", "TokenizedExample", "resolve_preprocessing"]


@dataclass(frozen=True)
class TokenizedExample:
    """One example's token ids, which of them the loss covers, and whether it was truncated."""

    ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        """Tokens the loss covers (token 0 never counts)."""
        return int(self.loss_mask[1:].sum())


def resolve_preprocessing(preprocessing: SFTPreprocessingConfig | None, fmt: RowFormat, where: Location
                          ) -> SFTPreprocessingConfig:
    """The preprocessing for a file of format `fmt`: the configured one, or the default for the format.

    The prompt/completion default puts one space between prompt and answer (upstream's SQuAD setting).
    Conversations need chat preprocessing; chat preprocessing reads prompt/completion rows as one turn each.
    """
    if preprocessing is None:
        return ChatSFTPreprocessingConfig() if fmt.chat else PromptCompletionSFTPreprocessingConfig(separator=" ")
    if fmt.chat and isinstance(preprocessing, PromptCompletionSFTPreprocessingConfig):
        raise where.error(f"a {fmt.name} file holds conversations, but dataset.preprocessing is a "
                          "PromptCompletionSFTPreprocessingConfig; use ChatSFTPreprocessingConfig (or None)")
    return preprocessing


class ExampleTokenizer:
    """Turns the checked rows of one file into `TokenizedExample`s (None: dropped, nothing to learn)."""

    def __init__(self, preprocessing: SFTPreprocessingConfig, tokenizer: Any, *, max_positions: int) -> None:
        self.preprocessing = preprocessing
        self.tokenizer = tokenizer
        self.max_ids = max_positions + 1
        self._template: ChatTemplate | None = None
        if isinstance(preprocessing, PromptCompletionSFTPreprocessingConfig) and preprocessing.add_bos:
            if tokenizer.bos_id is None:
                raise config_error("dataset.preprocessing.add_bos", True, "False: the tokenizer has no "
                                   "beginning-of-sequence token (bos_token in tokenizer_config.json)")

    def __call__(self, row: Row, where: Location) -> TokenizedExample | None:
        """The example of `row`, or None when truncation left nothing to learn."""
        if isinstance(self.preprocessing, ChatSFTPreprocessingConfig):
            messages = row if isinstance(row, list) else _as_conversation(row)
            example = self._conversation(messages, where)
        else:
            assert isinstance(row, PromptCompletion), "resolve_preprocessing refuses conversations here"
            example = self._prompt_completion(row, where)
        return example if example.num_targets > 0 else None

    def _prompt_completion(self, row: PromptCompletion, where: Location) -> TokenizedExample:
        config = self.preprocessing
        assert isinstance(config, PromptCompletionSFTPreprocessingConfig)
        bos = [self.tokenizer.bos_id] if config.add_bos else []
        try:  # a NullTokenizer reads the text as ids
            prompt = self.tokenizer.tokenize(config.prompt_template.format(prompt=row.prompt))
            answer = self.tokenizer.tokenize(config.separator + row.completion)
        except ValueError as err:
            raise where.error(f"cannot tokenize: {err}") from err
        if any(not 0 <= i < self.tokenizer.vocab_size for i in prompt + answer):
            raise where.error(f"token ids outside the vocabulary [0, {self.tokenizer.vocab_size})")
        answer += [self.tokenizer.eod] if config.add_eos else []
        prompt, answer, truncated = _truncate_prompt_first(
            prompt, answer, room=self.max_ids - len(bos), method=config.truncation_method
        )
        ids = np.asarray(bos + prompt + answer, dtype=np.int32)
        loss_mask = np.ones(len(ids), dtype=bool)
        if config.loss_mode == "completion":
            loss_mask[: len(bos) + len(prompt)] = False
        loss_mask[:1] = False
        return TokenizedExample(ids, loss_mask, truncated)

    def _conversation(self, messages: list[Message], where: Location) -> TokenizedExample:
        template = self._chat_template(where)
        loss_mode = self.preprocessing.loss_mode
        try:
            if loss_mode == "full":
                text, spans = template.render(messages), []
            else:
                text, spans = template.assistant_spans(messages)
        except SpanError as err:
            raise where.error(f"cannot find the assistant spans exactly: {err}") from err
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as err:
            raise where.error(f"the chat template {template.origin} failed on this conversation: {err}") from err
        ids, offsets = self.tokenizer.tokenize_with_offsets(text)
        if loss_mode == "full":
            loss_mask = np.ones(len(ids), dtype=bool)
        else:
            loss_mask = _tokens_in_spans(offsets, spans[-1:] if loss_mode == "last_turn" else spans, where)
        loss_mask[:1] = False
        truncated = len(ids) > self.max_ids
        ids, loss_mask = np.asarray(ids[: self.max_ids], dtype=np.int32), loss_mask[: self.max_ids]
        return TokenizedExample(ids, loss_mask, truncated)

    def _chat_template(self, where: Location) -> ChatTemplate:
        if self._template is None:
            try:
                source = self.tokenizer.chat_template
                if source is not None:
                    variables = self.tokenizer.template_variables
                    self._template = ChatTemplate(source.text, origin=source.origin, variables=variables)
            except ValueError as err:  # an unreadable or uncompilable template: named with the first line needing it
                raise where.error(str(err)) from err
            if source is None:
                where_tokenizer = getattr(self.tokenizer, "path", type(self.tokenizer).__name__)
                raise where.error(
                    f"conversations need a chat template, and the tokenizer {where_tokenizer} has none "
                    "(chat_template.jinja beside tokenizer.json, or chat_template in tokenizer_config.json)"
                )
        return self._template


def _as_conversation(row: PromptCompletion) -> list[Message]:
    return [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.completion}]


def _truncate_prompt_first(prompt: list[int], answer: list[int], *, room: int, method: str
                           ) -> tuple[list[int], list[int], bool]:
    """Fit `prompt + answer` into `room` ids: cut the prompt (on `method`'s side), then the answer's end."""
    if len(prompt) + len(answer) <= room:
        return prompt, answer, False
    prompt_room = room - len(answer)
    if prompt_room < 0:
        return [], answer[:room], True
    kept = prompt[:prompt_room] if method == "right" else prompt[len(prompt) - prompt_room:]
    return kept, answer, True


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[Span], where: Location) -> np.ndarray:
    """True for each token whose characters lie inside a span; a token across a span's edge is an error."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    inside = np.zeros(len(bounds), dtype=bool)
    for begin, end in spans:
        across = ((starts < begin) & (ends > begin)) | ((starts < end) & (ends > end))
        if across.any():
            token = int(np.flatnonzero(across)[0])
            raise SFTDataError(
                f"{where.path}:{where.line}: cannot find the assistant spans exactly: token {token} covers "
                f"characters {tuple(offsets[token])} across the edge of an assistant span {begin, end}"
            )
        inside |= (starts >= begin) & (ends <= end) & (ends > starts)
    return inside
