"""Loss masks (answer only, assistant turns, last turn, full), truncation and the tokenizer's chat parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sft_helpers import CHATML, CHATML_GENERATION, make_tokenizer_folder

from megatron.bridge.data import (
    ChatSFTPreprocessingConfig,
    HuggingFaceTokenizer,
    NullTokenizer,
    PromptCompletionSFTPreprocessingConfig,
)
from megatron.bridge.data.sft.builder import build_sft_split
from megatron.bridge.utils.errors import ConfigError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "Hello, world!"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def chatml_pieces(tokenizer, messages, supervised):
    """Ids and expected mask built piece by piece: header, content, <|im_end|>, newline (no span logic)."""
    ids, mask = [], []
    for index, message in enumerate(messages):
        learned = message["role"] == "assistant" and supervised(index)
        for text, in_loss in ((f"<|im_start|>{message['role']}\n", False), (message["content"], learned),
                              ("<|im_end|>", learned), ("\n", False)):
            piece = tokenizer.tokenize(text)
            ids += piece
            mask += [in_loss] * len(piece)
    return ids, mask


def only_example(split):
    return split.rows.ids.tolist(), split.rows.loss_mask.tolist()


@pytest.mark.parametrize("loss_mode", ["assistant", "last_turn", "full"])
def test_chat_mask_equals_the_assistant_spans_token_by_token(dataset, chatml, loss_mode):
    last = max(i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant")
    supervised = {"assistant": lambda i: True, "last_turn": lambda i: i == last, "full": lambda i: True}[loss_mode]
    expected_ids, expected_mask = chatml_pieces(chatml, CONVERSATION, supervised)
    config = dataset([{"messages": CONVERSATION}], preprocessing=ChatSFTPreprocessingConfig(loss_mode=loss_mode))
    ids, mask = only_example(build_sft_split(config, chatml, "train"))
    assert ids == expected_ids  # the whole rendering tokenizes as its pieces do
    if loss_mode == "full":
        expected_mask = [False] + [True] * (len(ids) - 1)
    assert mask == expected_mask
    if loss_mode != "full":
        expected_text = {"assistant": "Hello, world!<|im_end|>Paris.<|im_end|>", "last_turn": "Paris.<|im_end|>"}
        assert chatml.detokenize(np.asarray(ids)[mask]) == expected_text[loss_mode]


def test_generation_markers_mask_equals_transformers(dataset, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = make_tokenizer_folder(tmp_path / "marked", chat_template=CHATML_GENERATION)
    ours = HuggingFaceTokenizer(folder)
    ids, mask = only_example(build_sft_split(dataset([{"messages": CONVERSATION}]), ours, "train"))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    out = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert mask == [bool(m) for m in out["assistant_masks"]] and sum(mask) > 0
    # The markers here cover what the span search finds without them.
    plain_ids, plain_mask = only_example(build_sft_split(dataset([{"messages": CONVERSATION}]),
                                                         HuggingFaceTokenizer(make_tokenizer_folder(
                                                             tmp_path / "plain", chat_template=CHATML)), "train"))
    assert (plain_ids, plain_mask) == (ids, mask)


def test_our_rendering_equals_transformers(chatml_dir):
    transformers = pytest.importorskip("transformers")
    from megatron.bridge.data.sft.chat_template import ChatTemplate

    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}{{ m | tojson }}\n{% endfor %}"
                "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{% if add_generation_prompt %}GO{% endif %}")
    messages = [{"role": "user", "content": "héllo <b>"}, {"role": "assistant", "content": "x"}] * 2
    hf = transformers.AutoTokenizer.from_pretrained(chatml_dir)
    hf.bos_token = "<|endoftext|>"
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate(template, origin="test", variables={"bos_token": "<|endoftext|>"})
    assert ours.render(messages, add_generation_prompt=True) == expected


def test_answer_only_loss_for_prompt_completion(dataset):
    tokenizer = NullTokenizer(100)
    rows = [{"input": "5 6 7", "output": "8 9"}, {"input": "", "output": "4"}]
    split = build_sft_split(dataset(rows), tokenizer, "train")
    rows_ = split.rows
    assert rows_.ids.tolist() == [5, 6, 7, 8, 9, 99, 4, 99]
    assert rows_.loss_mask.tolist() == [False, False, False, True, True, True, False, True]
    full = build_sft_split(dataset(rows[:1], preprocessing=PromptCompletionSFTPreprocessingConfig(
        loss_mode="full", separator=" ")), tokenizer, "train")
    assert full.rows.loss_mask.tolist() == [False, True, True, True, True, True]  # token 0 is never a target
    assert split.stats.loss_tokens == 4 and split.stats.real_tokens == 6


@pytest.mark.parametrize(("method", "prompt_kept"), [("right", [1, 2]), ("left", [4, 5])])
def test_truncation_cuts_the_prompt_first(dataset, method, prompt_kept):
    tokenizer = NullTokenizer(100)
    preprocessing = PromptCompletionSFTPreprocessingConfig(truncation_method=method, separator=" ")
    # seq_length 4 -> 5 ids; the answer (8 9 eos) takes 3, so 2 of the 5 prompt ids survive.
    rows = [{"input": "1 2 3 4 5", "output": "8 9"}, {"input": "1", "output": "8 9"}]
    split = build_sft_split(dataset(rows, seq_length=4, preprocessing=preprocessing), tokenizer, "train")
    first = split.rows.ids[: split.rows.example_offsets[1]].tolist()
    assert first == prompt_kept + [8, 9, 99]
    assert split.stats.truncated == 1 and split.stats.dropped == 0


def test_an_answer_longer_than_the_budget_is_cut_at_its_end(dataset):
    split = build_sft_split(dataset([{"input": "1 2", "output": "3 4 5 6 7 8"}], seq_length=3), NullTokenizer(100),
                            "train")
    assert split.rows.ids.tolist() == [3, 4, 5, 6]  # no prompt, no eos: the answer did not end there
    assert split.rows.loss_mask.tolist() == [False, True, True, True]


def test_chat_truncation_cuts_the_end_and_drops_what_has_nothing_to_learn(dataset, chatml):
    def header(user: str) -> int:
        return len(chatml.tokenize(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"))

    def chat(user: str) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "Hello, world!"}]}

    long_header, short_header = header("Say hello"), header("a")
    assert short_header < long_header
    split = build_sft_split(dataset([chat("Say hello")] * 2, seq_length=long_header), chatml, "train")
    # Room for the header and one answer token (an example holds seq_length + 1 ids).
    assert split.stats.truncated == 2 and split.stats.dropped == 0
    assert len(split.rows.ids) == 2 * (long_header + 1) and split.stats.loss_tokens == 2
    dropping = build_sft_split(dataset([chat("Say hello"), chat("a")], seq_length=long_header - 1), chatml, "train")
    assert dropping.stats.dropped == 1 and dropping.stats.examples == 1 and dropping.stats.truncated == 1


def test_max_train_samples_caps_the_training_split(dataset):
    rows = [{"input": "1", "output": str(i)} for i in range(2, 9)] + ["not json"]
    split = build_sft_split(dataset(rows, max_train_samples=3), NullTokenizer(100), "train")
    assert split.stats.examples == 3 and split.rows.ids.tolist() == [1, 2, 99, 1, 3, 99, 1, 4, 99]


def test_add_bos_needs_a_bos_token(dataset, tmp_path):
    preprocessing = PromptCompletionSFTPreprocessingConfig(add_bos=True, separator=" ")
    config = dataset([{"input": "hello", "output": "world"}], preprocessing=preprocessing)
    with_bos = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "bos", bos=True))
    split = build_sft_split(config, with_bos, "train")
    assert split.rows.ids[0] == with_bos.bos_id and with_bos.bos_id is not None
    with pytest.raises(ConfigError, match="preprocessing.add_bos=True is invalid: False: the tokenizer has no begin"):
        build_sft_split(config, NullTokenizer(100), "train")


def test_chat_template_sources_and_priority(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "tok", chat_template=None)
    assert HuggingFaceTokenizer(folder).chat_template is None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "from config"}))
    source = HuggingFaceTokenizer(folder).chat_template
    assert source.text == "from config" and source.origin.endswith("tokenizer_config.json (chat_template)")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**config, "chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}))
    assert HuggingFaceTokenizer(folder).chat_template.text == "d"
    (folder / "chat_template.jinja").write_text("from file")  # transformers 5's file wins over the config
    tokenizer = HuggingFaceTokenizer(folder)
    assert tokenizer.chat_template.text == "from file"
    assert tokenizer.template_variables == {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def test_offsets_tile_the_text_and_ids_match_tokenize(chatml):
    text = "<|im_start|>user\n  Say hello  <|im_end|>\n"
    ids, offsets = chatml.tokenize_with_offsets(text)
    assert ids == chatml.tokenize(text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))


def test_fingerprint_follows_the_tokenizer_and_its_template(tmp_path):
    a = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "a"))
    b = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "b"))
    c = HuggingFaceTokenizer(make_tokenizer_folder(tmp_path / "c", chat_template=CHATML_GENERATION))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert NullTokenizer(10).fingerprint != NullTokenizer(11).fingerprint
