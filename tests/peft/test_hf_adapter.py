"""Our adapters as Hugging Face PEFT folders: `peft` loads them with our logits, and they read back."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft_helpers import train_steps
from safetensors.torch import load_file, save_file

from megatron.bridge import AutoBridge
from megatron.bridge.models import GPTModelProvider
from megatron.bridge.models.conversion.peft_adapter import load_hf_adapter, save_hf_adapter, save_hf_adapter_state_dict
from megatron.bridge.peft import DoRA, LoRA, adapter_state_dict, load_adapter_state_dict, merge
from megatron.bridge.utils.errors import UserError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
Q_PROJ = "base_model.model.model.layers.0.self_attn.{}_proj"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Qwen2 (grouped queries, q/k/v biases, tied embeddings) saved by transformers, all weights random."""
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.1) if "norm" in name else param.normal_(0.0, 0.08)
    folder = tmp_path_factory.mktemp("hf") / "qwen2"
    model.save_pretrained(folder)
    return folder


def adapted(folder: Path, config) -> torch.nn.Module:
    """Ours, from the Hugging Face folder through the bridge, adapted and trained for two real steps."""
    model = config(AutoBridge.from_hf_pretrained(folder).to_megatron_model()[0])
    train_steps(model, 2, lr=3e-2)
    return model


def hf_base(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


CONFIGS = {
    "lora": LoRA(dim=4, alpha=8),
    "dora": DoRA(dim=4, alpha=8),
    "lora-some-layers": LoRA(dim=4, alpha=8, target_modules=["*.layers.1.*.linear_qkv", "linear_fc2"]),
}


@pytest.fixture(scope="module")
def exports(hf_folder, tmp_path_factory):
    """`exports(name)`: (config, trained model, adapter folder) for a `CONFIGS` entry, made once per module."""
    made = {}

    def export(name: str):
        if name not in made:
            config = CONFIGS[name]
            model = adapted(hf_folder, config)
            folder = save_hf_adapter(model, tmp_path_factory.mktemp("adapter") / name, peft_config=config,
                                     base_model_name_or_path=str(hf_folder))
            made[name] = config, model, folder
        return made[name]

    return export


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_loads_the_folder_and_computes_our_logits(name, exports, hf_folder):
    config, model, folder = exports(name)
    with torch.no_grad():
        ours = model(IDS)
        plain = hf_base(hf_folder)(IDS).logits
        loaded = peft.PeftModel.from_pretrained(hf_base(hf_folder), folder).eval()
        theirs = loaded(IDS).logits
    assert (ours - plain).abs().max() > 1e-3  # trained adapters make a difference
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    adapted_modules = {n.removesuffix(".lora_A") for n, _ in loaded.named_modules() if n.endswith(".lora_A")}
    expected = 14 if name != "lora-some-layers" else 5  # 7 projections x 2 layers; or q, k, v of layer 1 + 2 downs
    assert len(adapted_modules) == expected

    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert (written["r"], written["lora_alpha"], written["use_dora"]) == (4, 8, name == "dora")
    assert written["base_model_name_or_path"] == str(hf_folder) and written["bias"] == "none"
    if name == "lora-some-layers":
        assert written["target_modules"].startswith(r"model\.layers\.0\.mlp\.down_proj|")
    else:
        assert written["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_the_folder_holds_a_copied_and_b_split_by_rows(name, exports):
    _, model, folder = exports(name)
    tensors = load_file(folder / "adapter_model.safetensors")
    ours = adapter_state_dict(model)
    a = ours["layers.0.self_attention.linear_qkv_adapter.linear_in.weight"]
    b = ours["layers.0.self_attention.linear_qkv_adapter.linear_out.weight"]
    for member, rows in (("q", slice(0, 64)), ("k", slice(64, 96)), ("v", slice(96, 128))):
        assert torch.equal(tensors[Q_PROJ.format(member) + ".lora_A.weight"], a)
        assert torch.equal(tensors[Q_PROJ.format(member) + ".lora_B.weight"], b[rows])
    magnitude = Q_PROJ.format("k") + ".lora_magnitude_vector"
    if name == "dora":
        assert torch.equal(tensors[magnitude],
                           ours["layers.0.self_attention.linear_qkv_adapter.weight_magnitude"][64:96])
    else:
        assert magnitude not in tensors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_folder_reads_back_into_our_adapters(name, exports, hf_folder):
    config, model, folder = exports(name)
    read_config, state = load_hf_adapter(folder, model.config)
    assert type(read_config) is type(config)
    assert (read_config.dim, read_config.alpha, read_config.dropout) == (config.dim, config.alpha, config.dropout)
    assert state.keys() == adapter_state_dict(model).keys()
    fresh = read_config(AutoBridge.from_hf_pretrained(hf_folder).to_megatron_model()[0])
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(IDS), model(IDS), atol=0, rtol=0)


def _tampered(folder: Path, tmp_path: Path, change) -> Path:
    copy_ = tmp_path / "tampered"
    shutil.copytree(folder, copy_)
    tensors = load_file(copy_ / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, copy_ / "adapter_model.safetensors")
    return copy_


def test_independent_or_incomplete_members_are_refused(exports, tmp_path):
    _, model, folder = exports("lora")

    def perturb_k(tensors):
        tensors[Q_PROJ.format("k") + ".lora_A.weight"] += 1e-3

    def drop_v(tensors):
        for kind in ("A", "B"):
            del tensors[Q_PROJ.format("v") + f".lora_{kind}.weight"]

    with pytest.raises(UserError, match=r"k_proj.lora_A.weight differs from .*q_proj.lora_A.weight; our linear_qkv"):
        load_hf_adapter(_tampered(folder, tmp_path / "a", perturb_k), model.config)
    with pytest.raises(UserError, match=r"v_proj has no adapter while the other members of linear_qkv do"):
        load_hf_adapter(_tampered(folder, tmp_path / "b", drop_v), model.config)

    config = json.loads((folder / "adapter_config.json").read_text())
    odd = tmp_path / "rslora"
    shutil.copytree(folder, odd)
    (odd / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(UserError, match="use_rslora=True cannot be expressed"):
        load_hf_adapter(odd, model.config)


def test_existing_folders_are_kept_unless_overwrite(exports, tmp_path):
    config, model, _ = exports("lora")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        save_hf_adapter(model, target, peft_config=config)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    save_hf_adapter(model, target, peft_config=config, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(tmp_path.glob(".tmp_*"))
    with pytest.raises(UserError, match="peft.dim=8 and this model's sizes"):
        save_hf_adapter(model, tmp_path / "wrong", peft_config=LoRA(dim=8, alpha=8))
    with pytest.raises(UserError, match="is LoRA but peft_config is DoRA"):
        save_hf_adapter(model, tmp_path / "wrong", peft_config=DoRA(dim=4, alpha=8))
    with pytest.raises(UserError, match="no adapters"):
        save_hf_adapter(merge(copy.deepcopy(model)), tmp_path / "wrong", peft_config=config)
    prefixed = {f"model.{name}": t for name, t in adapter_state_dict(model).items()}  # a checkpoint's raw keys
    with pytest.raises(UserError, match=r"holds tensors that are no adapter of this model: model\.layers\.0\."):
        save_hf_adapter_state_dict(prefixed, tmp_path / "wrong", provider=model.config, peft_config=config)
    assert not (tmp_path / "wrong").exists()
    # Hugging Face module names come from the model's family; a provider of none has no names to give.
    fields = dataclasses.fields(GPTModelProvider)
    familyless = GPTModelProvider(**{f.name: getattr(model.config, f.name) for f in fields})
    with pytest.raises(UserError, match=r"GPTModelProvider belongs to no model family .*qwen2 \(Qwen2ForCausalLM"):
        save_hf_adapter_state_dict(adapter_state_dict(model), tmp_path / "wrong", provider=familyless,
                                   peft_config=config)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_a_merged_export_loads_in_transformers_with_our_logits(name, exports, hf_folder, tmp_path):
    _, model, _ = exports(name)
    bridge = AutoBridge.from_hf_pretrained(hf_folder)
    folder = bridge.save_hf_pretrained(merge(copy.deepcopy(model)), tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(hf_base(folder)(IDS).logits, model(IDS), atol=1e-5, rtol=0)
