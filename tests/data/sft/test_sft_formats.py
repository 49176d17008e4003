"""Finetuning rows: every format read, recognised from its keys, and every bad line named by file and line."""

from __future__ import annotations

import os

import pytest
from sft_helpers import CHATML, make_tokenizer_folder

from megatron.bridge.data import (
    ChatSFTPreprocessingConfig,
    HuggingFaceTokenizer,
    NullTokenizer,
    PackedSequenceSpecs,
    PromptCompletionSFTPreprocessingConfig,
    SFTDataError,
)
from megatron.bridge.data.sft.builder import build_sft_split


def decoded_answers(split, tokenizer) -> list[str]:
    rows = split.rows
    out = []
    for e in range(len(rows.example_offsets) - 1):
        span = slice(rows.example_offsets[e], rows.example_offsets[e + 1])
        out.append(tokenizer.detokenize(rows.ids[span][rows.loss_mask[span]]))
    return out


CHAT = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello, world!"}]


@pytest.mark.parametrize(
    ("row", "answer"),
    [
        ({"input": "Say hello", "output": "Hello, world!"}, " Hello, world!<|endoftext|>"),
        ({"prompt": "Say hello", "completion": "Hello, world!", "id": 7}, " Hello, world!<|endoftext|>"),
        ({"messages": CHAT}, "Hello, world!<|im_end|>"),
        ({"conversations": [{"from": "human", "value": "Say hello"}, {"from": "gpt", "value": "Hello, world!"}]},
         "Hello, world!<|im_end|>"),
    ],
    ids=["input/output", "prompt/completion", "messages", "sharegpt"],
)
def test_each_format_is_recognised_from_its_keys(dataset, chatml, row, answer):
    split = build_sft_split(dataset([row, row]), chatml, "train")
    assert decoded_answers(split, chatml) == [answer, answer]
    assert split.stats.examples_read == 2 and split.stats.truncated == split.stats.dropped == 0


def test_sharegpt_system_and_roles_render_like_messages(dataset, chatml):
    sharegpt = {"system": "Be brief.", "conversations": [{"from": "Human", "value": "Say hello"},
                                                           {"from": "GPT", "value": "Hello, world!"}]}
    messages = {"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}
    a = build_sft_split(dataset([sharegpt]), chatml, "train").rows
    b = build_sft_split(dataset([messages]), chatml, "train").rows
    assert (a.ids == b.ids).all() and (a.loss_mask == b.loss_mask).all()


def test_chat_preprocessing_reads_prompt_completion_rows_as_one_turn(dataset, chatml):
    config = dataset([{"input": "Say hello", "output": "Hello, world!"}], preprocessing=ChatSFTPreprocessingConfig())
    as_chat = build_sft_split(config, chatml, "train").rows
    direct = build_sft_split(dataset([{"messages": CHAT}]), chatml, "train").rows
    assert (as_chat.ids == direct.ids).all() and (as_chat.loss_mask == direct.loss_mask).all()


def test_prompt_template_and_separator(dataset):
    tokenizer = NullTokenizer(100)
    preprocessing = PromptCompletionSFTPreprocessingConfig(prompt_template="1 {prompt} 2", separator=" 3 ")
    split = build_sft_split(dataset([{"prompt": "7 8", "completion": "9"}], preprocessing=preprocessing),
                            tokenizer, "train")
    assert split.rows.ids.tolist() == [1, 7, 8, 2, 3, 9, 99]
    assert split.rows.loss_mask.tolist() == [False] * 4 + [True] * 3


BAD_CASES = {
    "not JSON": (['{"input": "a", "output": "b"}', '{"input": "a", "output": '], r":2: not valid JSON"),
    "not an object": (['["input", "output"]'], r":1: expected a JSON object, got a list"),
    "unknown format": ([{"question": "a", "answer": "b"}], r":1: keys \[answer, question\] match no finetuning format"),
    "two formats": ([{"input": "a", "output": "b", "messages": []}], r":1: keys .* match several formats"),
    "missing key": ([{"input": "a", "output": "b"}, {"input": "a"}],
                    r":2: missing key 'output': line 1 set the file's format to input/output"),
    "mixed formats": ([{"input": "a", "output": "b"}, {"prompt": "a", "completion": "b"}],
                      r":2: missing key 'input'.*looks like prompt/completion"),
    "empty answer": ([{"input": "a", "output": "b"}, "", {"input": "a", "output": "  "}], r":3: 'output' is empty"),
    "wrong type": ([{"input": "a", "output": 3}], r":1: 'output' must be a string, got an integer"),
    "message not an object": ([{"messages": ["hi"]}], r":1: messages\[0\] must be an object"),
    "content not a string": ([{"messages": [{"role": "user", "content": ["a"]}]}],
                             r":1: messages\[0\].content must be a string, got a list"),
    "chat without assistant": ([{"messages": [{"role": "user", "content": "a"}]}], r":1: .* has no assistant message"),
    "empty assistant": ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}],
                        r":1: messages\[1\] is an assistant message with empty content"),
    "unknown speaker": ([{"conversations": [{"from": "bot", "value": "a"}]}],
                        r":1: conversations\[0\].from='bot' is not a known speaker"),
    "conversation for prompt preprocessing": ([{"messages": CHAT}],
                                              r":1: .*use ChatSFTPreprocessingConfig"),
    "empty file": (["", "  "], r" holds no examples"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_lines_are_named_and_nothing_is_written(dataset, chatml, case):
    rows, message = BAD_CASES[case]
    prompt_only = case == "conversation for prompt preprocessing"
    preprocessing = PromptCompletionSFTPreprocessingConfig() if prompt_only else None
    config = dataset(rows, preprocessing=preprocessing, enable_offline_packing=True,
                     offline_packing_specs=PackedSequenceSpecs(packed_sequence_size=64))
    with pytest.raises(SFTDataError, match=r"training\.jsonl" + message):
        build_sft_split(config, chatml, "train")
    assert os.listdir(config.dataset_root) == ["training.jsonl"]  # no packed/ folder, no cache, no temp file


def test_text_a_null_tokenizer_cannot_read_is_named(dataset):
    for output, message in (("3 x", r":1: cannot tokenize: invalid literal"), ("3 100", r":1: token ids outside")):
        with pytest.raises(SFTDataError, match=r"training\.jsonl" + message):
            build_sft_split(dataset([{"input": "1 2", "output": output}]), NullTokenizer(100), "train")


def test_templates_that_fail_are_named_with_the_data_line(dataset, tmp_path):
    broken = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "broken", chat_template="{% for m in messages %}"))
    refusing = HuggingFaceTokenizer(make_tokenizer_folder(
        tmp_path / "refusing", chat_template="{{ raise_exception('roles must alternate') }}"))
    no_template = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "plain", chat_template=None))
    config = dataset([{"input": "a", "output": "b"}, {"messages": CHAT}], preprocessing=ChatSFTPreprocessingConfig())
    with pytest.raises(SFTDataError, match=r"training\.jsonl:1: the chat template .*chat_template.jinja does not "
                                           r"compile: line 1"):
        build_sft_split(config, broken, "train")
    with pytest.raises(SFTDataError, match=r"training\.jsonl:1: the chat template .* failed .*roles must alternate"):
        build_sft_split(config, refusing, "train")
    with pytest.raises(SFTDataError, match=r"training\.jsonl:1: conversations need a chat template"):
        build_sft_split(config, no_template, "train")
    unreadable = make_tokenizer_folder(tmp_path / "unreadable", chat_template=None)
    os.mkdir(unreadable / "chat_template.jinja")  # a folder where the file should be
    with pytest.raises(SFTDataError, match=r"training\.jsonl:1: cannot read the chat template"):
        build_sft_split(config, HuggingFaceTokenizer(unreadable), "train")


def test_template_that_renders_earlier_turns_differently_is_an_error(dataset, tmp_path):
    # The last message is written differently from the others, so no prefix rendering is a prefix of the whole.
    template = CHATML.replace("message['content'] + '<|im_end|>'",
                              "message['content'] + ('<|im_end|>' if not loop.last else '<|endoftext|>')")
    tokenizer = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "odd", chat_template=template))
    config = dataset([{"messages": CHAT}])
    with pytest.raises(SFTDataError, match=r"training\.jsonl:1: cannot find the assistant spans exactly"):
        build_sft_split(config, tokenizer, "train")


def test_token_across_an_answer_edge_is_an_error(dataset, tmp_path):
    # The generation prompt ends in a space that byte-level BPE merges into the answer's first word.
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
    tokenizer = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "space", chat_template=template))
    config = dataset([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(SFTDataError, match=r"training\.jsonl:1: .*token \d+ covers characters .* across the edge"):
        build_sft_split(config, tokenizer, "train")
