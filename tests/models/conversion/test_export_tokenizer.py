"""A model trained from scratch with a Hugging Face tokenizer exports with that tokenizer (issue: none was written)."""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_config
from megatron.bridge import AutoBridge
from megatron.bridge.data.tokenizer import HuggingFaceTokenizer
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

transformers = pytest.importorskip("transformers")

TEXT = ["the quick brown fox jumps over the lazy dog", "a tokenizer made for this test, with its own end token"]


def make_tokenizer(folder, *, with_config: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT * 10, trainer=trainer)
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<s>"}))
    return folder


@pytest.mark.parametrize("with_config", [True, False], ids=["tokenizer_config", "tokenizer.json only"])
def test_export_writes_the_runs_tokenizer_and_its_ids(tmp_path, with_config):
    folder = make_tokenizer(tmp_path / "tok", with_config=with_config)
    cfg = make_tiny_config(train__train_iters=1, checkpoint__save=str(tmp_path / "ckpt"), validation__eval_iters=0)
    cfg.tokenizer.tokenizer_type, cfg.tokenizer.tokenizer_model = "HuggingFaceTokenizer", str(folder)
    cfg.tokenizer.vocab_size = None
    cfg.model.vocab_size = None
    pretrain(cfg, forward_step)
    out = AutoBridge.export_ckpt(tmp_path / "ckpt", tmp_path / "hf")

    ours = HuggingFaceTokenizer(folder)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ours.eod
    assert config.get("bos_token_id") == ours.bos_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eod
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token_id == ours.eod
    for text in TEXT:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == ours.eod
