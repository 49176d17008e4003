"""A Hugging Face model in, LoRA-finetuned, and out again: merged weights, the adapter folder, the command line.

The run takes its base weights straight from the Hugging Face folder (`checkpoint.pretrained_checkpoint`),
trains LoRA adapters for three steps and saves them; `transformers` and `peft` then load what the
bridge writes, and their logits equal ours.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hf_tiny import token_ids
from safetensors.torch import load_file

from helpers import make_tiny_config
from megatron.bridge import AutoBridge
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.convert import main as convert_main
from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.peft.state import adapter_state_dict, base_parameters, merge
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.finetune import finetune
from megatron.bridge.training.gpt_step import forward_step

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = LoRA(dim=4, alpha=8)


class FinalModel(Callback):
    def on_train_end(self, context):
        self.model = context.model[0]


@pytest.fixture(scope="module")
def lora_run(qwen2_folder, tmp_path_factory):
    """(bridge, the trained adapted model, its checkpoint folder): three LoRA steps on the Qwen2 folder."""
    bridge = AutoBridge.from_hf_pretrained(qwen2_folder)
    cfg = make_tiny_config(train__train_iters=3, optimizer__lr=5e-2)
    cfg.model = bridge.to_megatron_provider(load_weights=False)
    cfg.model.seq_length = cfg.dataset.seq_length
    cfg.model.vocab_size = None
    cfg.tokenizer.vocab_size = bridge.hf_config["vocab_size"]
    cfg.checkpoint.pretrained_checkpoint = str(qwen2_folder)
    cfg.checkpoint.save = str(tmp_path_factory.mktemp("lora") / "ckpt")
    cfg.peft = copy.deepcopy(LORA)
    final = FinalModel()
    finetune(cfg, forward_step, [final])
    return bridge, final.model.eval(), Path(cfg.checkpoint.save)


def test_the_adapter_folder_loads_in_peft_with_our_logits(lora_run, qwen2_model, tmp_path):
    bridge, model, _ = lora_run
    folder = bridge.save_hf_adapter(model, tmp_path / "adapter", peft_config=LORA)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(qwen2_model), folder).eval()
    ids = token_ids(qwen2_model.config.vocab_size)
    with torch.no_grad():
        theirs = adapted(ids).logits
    ours = model(ids)[..., : theirs.shape[-1]]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, qwen2_model(ids).logits, atol=1e-3), "the adapters changed the model"


def test_the_run_checkpoint_exports_the_same_adapter_folder(lora_run, tmp_path):
    bridge, model, checkpoints = lora_run
    from_model = bridge.save_hf_adapter(model, tmp_path / "from_model", peft_config=LORA)
    status = convert_main(["export-adapter", str(checkpoints), str(tmp_path / "from_ckpt")])
    assert status == 0
    expected = load_file(from_model / "adapter_model.safetensors")
    exported = load_file(tmp_path / "from_ckpt" / "adapter_model.safetensors")
    assert expected.keys() == exported.keys()
    assert all(torch.equal(expected[k], exported[k]) for k in expected)
    config = json.loads((tmp_path / "from_ckpt" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert Path(config["base_model_name_or_path"]).resolve() == bridge.folder.resolve()


def test_saved_weights_are_merged_by_default_and_the_base_on_request(lora_run, tmp_path):
    bridge, model, _ = lora_run
    merged = merge(copy.deepcopy(model))
    exported = dict(bridge.export_hf_weights(model))
    base = dict(bridge.export_hf_weights(model, merge_adapter_weights=False))
    for name, param in merged.named_parameters():
        hf_name = bridge.family.to_hf_name(name)
        torch.testing.assert_close(exported[hf_name], param.detach(), atol=0, rtol=0)
    for name, param in base_parameters(model).items():
        assert torch.equal(base[bridge.family.to_hf_name(name)], param.detach())
    bridge.save_hf_pretrained(model, tmp_path / "merged")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = token_ids(loaded.config.vocab_size)
    with torch.no_grad():
        theirs = loaded(ids).logits
    torch.testing.assert_close(model(ids)[..., : theirs.shape[-1]].detach(), theirs, atol=1e-5, rtol=1e-5)


def test_a_lora_checkpoint_holds_adapters_and_export_ckpt_says_what_to_do(lora_run, tmp_path):
    _, model, checkpoints = lora_run
    stored = checkpoint_io.read_index(checkpoint_io.find_latest(checkpoints)).state_dict_metadata
    assert {k[len("model."):] for k in stored if k.startswith("model.")} == set(adapter_state_dict(model))
    with pytest.raises(ConversionError, match="export_adapter_ckpt"):
        AutoBridge.export_ckpt(checkpoints, tmp_path / "whole")
    assert not (tmp_path / "whole").exists()
