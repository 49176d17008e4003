"""`finetune`: a Hugging Face model imported, finetuned on the CPU, exported and loaded by `transformers`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers import make_tiny_config
from megatron.bridge import AutoBridge
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.finetune import finetune
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.utils.errors import ConfigError

transformers = pytest.importorskip("transformers")

HF_VOCAB = 256  # larger than the tiny config's tokenizer (128): the model keeps Hugging Face's vocabulary
EVENTS = ("on_data_init_start", "on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end",
          "on_eval_start", "on_eval_end", "on_test_start", "on_test_end", "on_checkpoint_save")


class Recorder(Callback):
    """Records (event, step), the losses, the weights at the start and the model at the end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.losses: list[float] = []
        self.start_embedding: torch.Tensor | None = None
        self.model: torch.nn.Module | None = None

    def _record(self, name: str, context: Any) -> None:
        self.events.append((name, context.state.train_state.step))
        if name == "on_train_start":
            self.start_embedding = context.model[0].embedding.weight.detach().clone()
        elif name == "on_train_step_end":
            self.losses.append(context.loss_dict["lm loss"].item())
        elif name == "on_train_end":
            self.model = context.model[0]


for _event in EVENTS:
    setattr(Recorder, _event, lambda self, context, _name=_event: self._record(_name, context))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.05)
    folder = tmp_path_factory.mktemp("hf") / "qwen2-tiny"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return folder


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory) -> Path:
    return AutoBridge.import_ckpt(hf_folder, tmp_path_factory.mktemp("ckpt") / "qwen2-tiny")


def config_from(hf_folder: Path, *, load_weights: bool = False, **overrides: Any) -> ConfigContainer:
    cfg = make_tiny_config(**overrides)
    cfg.model = AutoBridge.from_hf_pretrained(hf_folder).to_megatron_provider(load_weights=load_weights)
    cfg.model.seq_length = cfg.dataset.seq_length  # the HF context (32768) is far longer than needed here
    return cfg


def hf_embedding(hf_folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    return model.get_input_embeddings().weight.detach()


def test_import_finetune_export_and_load_with_transformers(hf_folder, imported, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_from(hf_folder, train__train_iters=5)
    cfg.checkpoint.pretrained_checkpoint = str(imported)
    cfg.checkpoint.save = str(run_dir)
    recorder = Recorder()
    finetune(cfg, forward_step, [recorder])

    assert recorder.events[:2] == [("on_data_init_start", 0), ("on_train_start", 0)]  # step 0, not resumed
    assert [s for e, s in recorder.events if e == "on_train_step_end"] == [0, 1, 2, 3, 4]
    assert ("on_checkpoint_save", 5) in recorder.events and ("on_train_end", 5) in recorder.events
    assert torch.equal(recorder.start_embedding, hf_embedding(hf_folder))  # began from the HF weights
    assert recorder.losses[-1] < recorder.losses[0]

    out = AutoBridge.export_ckpt(run_dir, tmp_path / "hf")
    # config.json and the tokenizer came from the imported checkpoint the run started from.
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_folder / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (hf_folder / "tokenizer.json").read_bytes()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, HF_VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    ours = recorder.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids), atol=1e-5, rtol=0)
        assert not torch.equal(ours.embedding.weight, recorder.start_embedding)  # training changed the weights


def test_finetune_fires_the_same_events_as_pretrain(hf_folder, imported):
    runs = []
    for entry in (pretrain, finetune):
        cfg = config_from(hf_folder, train__train_iters=3)
        cfg.checkpoint.pretrained_checkpoint = str(imported)
        recorder = Recorder()
        entry(cfg, forward_step, [recorder])
        runs.append(recorder)
    assert runs[0].events == runs[1].events
    assert runs[0].losses == runs[1].losses


def test_finetune_resumes_from_load_when_it_holds_a_checkpoint(hf_folder, imported, tmp_path):
    run_dir = str(tmp_path / "run")
    first = config_from(hf_folder, train__train_iters=2, checkpoint__save=run_dir)
    first.checkpoint.pretrained_checkpoint = str(imported)
    finetune(first, forward_step)
    second = config_from(hf_folder, train__train_iters=4, checkpoint__save=run_dir, checkpoint__load=run_dir)
    second.checkpoint.pretrained_checkpoint = str(imported)
    recorder = Recorder()
    finetune(second, forward_step, [recorder])
    assert ("on_train_start", 2) in recorder.events  # a normal resume: step 2, not 0
    assert [s for e, s in recorder.events if e == "on_train_step_end"] == [2, 3]


def test_finetune_from_a_provider_that_loads_hf_weights(hf_folder):
    cfg = config_from(hf_folder, load_weights=True, train__train_iters=1)
    recorder = Recorder()
    finetune(cfg, forward_step, [recorder])
    assert torch.equal(recorder.start_embedding, hf_embedding(hf_folder))


def test_finetune_without_weights_to_start_from_is_refused(hf_folder, tmp_path):
    cfg = config_from(hf_folder)
    with pytest.raises(ValueError, match=r"checkpoint\.pretrained_checkpoint=None is invalid for finetune: "
                                         r"checkpoint\.load is None"):
        finetune(cfg, forward_step)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.checkpoint.load = str(empty)
    with pytest.raises(ValueError, match=r"checkpoint\.load='.*empty' holds no checkpoint.*set "
                                         r"checkpoint\.pretrained_checkpoint"):
        finetune(cfg, forward_step)
    cfg.checkpoint.pretrained_checkpoint = str(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match=r"checkpoint\.pretrained_checkpoint='.*nothing-here' is invalid: it holds "
                                         "no checkpoint"):
        finetune(cfg, forward_step)
    assert not dist.is_initialized() and list(empty.iterdir()) == []  # refused before any work


def test_finetune_refuses_a_checkpoint_load_that_does_not_exist(hf_folder, imported, tmp_path):
    # A typo in checkpoint.load would silently drop the resume; with weights to start from, it is still refused.
    typo = tmp_path / "ckpts-typo"
    cfg = config_from(hf_folder, checkpoint__pretrained_checkpoint=str(imported), checkpoint__load=str(typo),
                      checkpoint__save=str(tmp_path / "ckpts"))
    with pytest.raises(ConfigError, match=rf"checkpoint\.load='{typo}' is invalid: the path does not exist"):
        finetune(cfg, forward_step)
    assert not dist.is_initialized() and not (tmp_path / "ckpts").exists()  # refused before any work
