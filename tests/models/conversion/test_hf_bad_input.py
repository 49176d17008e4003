"""Bad input: each a clear error naming the file or tensor, raised before anything is written."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_tiny import folder_snapshot
from safetensors.torch import load_file, save_file

from megatron.bridge import AutoBridge
from megatron.bridge.models import registry
from megatron.bridge.models.registry import provider_from_hf_config


def copy_folder(source: Path, tmp_path: Path, name: str = "src") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def assert_fails_writing_nothing(tmp_path: Path, source: Path, match: str) -> None:
    """Opening, importing and converting all fail with `match`; no output (or leftover) appears."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        AutoBridge.from_hf_pretrained(source)
    with pytest.raises(ValueError, match=match):
        AutoBridge.import_ckpt(source, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_config_json(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    (source / "config.json").unlink()
    assert_fails_writing_nothing(tmp_path, source, r"src/config\.json not found")
    assert not AutoBridge.can_handle(source)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        AutoBridge.from_hf_pretrained(tmp_path / "nowhere")


def test_missing_shard(llama_folder, tmp_path):
    source = copy_folder(llama_folder, tmp_path)
    (source / "model-00002-of-00012.safetensors").unlink()
    assert_fails_writing_nothing(tmp_path, source, r"shard model-00002-of-00012\.safetensors listed in .*index\.json "
                                                   "is missing")


def test_missing_tensor(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    rewrite_weights(source, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_fails_writing_nothing(tmp_path, source, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight")


def test_unexpected_tensor(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    rewrite_weights(source, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    assert_fails_writing_nothing(
        tmp_path, source, r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight \(in model\.safetensors\)")


def test_shape_mismatch_names_both_shapes(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    rewrite_config(source, intermediate_size=80)
    assert_fails_writing_nothing(
        tmp_path, source,
        r"model\.layers\.0\.mlp\.gate_proj\.weight \(in model\.safetensors\) has shape \(96, 64\), "
        r".*config\.json expects \(80, 64\)",
    )


def test_unsupported_architecture_lists_the_registry(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    rewrite_config(source, architectures=["PhiForCausalLM"], model_type="phi")
    assert_fails_writing_nothing(
        tmp_path, source, "architecture PhiForCausalLM is not supported; supported: Qwen2ForCausalLM, "
                          "Qwen3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Gemma3ForCausalLM$")
    assert not AutoBridge.can_handle(source)
    names = [name for family in registry.FAMILIES for name in family.architectures]
    assert AutoBridge.list_supported_models() == names == [
        "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM"]


def test_without_architectures_the_files_model_type_names_the_family(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    config = json.loads((source / "config.json").read_text())
    del config["architectures"]
    (source / "config.json").write_text(json.dumps(config))
    assert type(AutoBridge.from_hf_pretrained(source).to_megatron_provider(load_weights=False)).__name__ == (
        "Qwen2ModelProvider")
    rewrite_config(source, model_type="phi")
    assert_fails_writing_nothing(tmp_path, source, "architecture model_type='phi' is not supported; supported: "
                                                   "Qwen2ForCausalLM, ")


@pytest.mark.parametrize(("changes", "match"), [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0 is invalid"),
])
def test_unsupported_config_fields(qwen2_folder, changes, match):
    config = json.loads((qwen2_folder / "config.json").read_text())
    config.update(changes)
    with pytest.raises(ValueError, match=match):
        provider_from_hf_config(config, "config.json")


def test_llama_with_attention_bias_but_no_mlp_bias_is_refused(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config.update(attention_bias=True, mlp_bias=False)
    with pytest.raises(ValueError, match="attention_bias=True with mlp_bias=False is not supported"):
        provider_from_hf_config(config)


def test_corrupt_safetensors_header(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    (source / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert_fails_writing_nothing(tmp_path, source, r"model\.safetensors is not a valid safetensors file")


def test_pickle_weights_never_run_code(qwen2_folder, tmp_path):
    source = copy_folder(qwen2_folder, tmp_path)
    (source / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")  # would create `marker` if unpickled freely

    torch.save({"model.embed_tokens.weight": Payload()}, source / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model\.bin.*weights_only=True"):
        AutoBridge.from_hf_pretrained(source)
    assert not marker.exists()


@pytest.mark.parametrize("call", ["save_hf_pretrained", "import_ckpt", "export_ckpt"])
def test_non_empty_output_is_not_overwritten_without_overwrite(call, qwen2_folder, tmp_path):
    bridge = AutoBridge.from_hf_pretrained(qwen2_folder)
    model = bridge.to_megatron_model()
    ckpt = AutoBridge.import_ckpt(qwen2_folder, tmp_path / "ckpt") if call == "export_ckpt" else None
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    runs = {
        "save_hf_pretrained": lambda **kw: bridge.save_hf_pretrained(model, out, **kw),
        "import_ckpt": lambda **kw: AutoBridge.import_ckpt(qwen2_folder, out, **kw),
        "export_ckpt": lambda **kw: AutoBridge.export_ckpt(ckpt, out, **kw),
    }
    before = folder_snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"output folder .*out exists and is not empty; pass overwrite=True"):
        runs[call]()
    assert folder_snapshot(tmp_path) == before
    runs[call](overwrite=True)
    assert not (out / "keep.txt").exists() and any(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp_", ".trash_"))]


def test_exporting_a_model_of_another_shape_names_the_tensor(qwen2_folder, llama_folder, tmp_path):
    qwen = AutoBridge.from_hf_pretrained(qwen2_folder)
    llama_model = AutoBridge.from_hf_pretrained(llama_folder).to_megatron_model()
    with pytest.raises(ValueError, match=r"missing tensors: .*linear_q\.bias.*embedding\.weight has shape "
                                         r"\(256, 64\), .*expects \(250, 64\)"):
        qwen.save_hf_pretrained(llama_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_missing_checkpoint_or_iteration(qwen2_folder, tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        AutoBridge.export_ckpt(tmp_path, tmp_path / "out")
    ckpt = AutoBridge.import_ckpt(qwen2_folder, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"no checkpoint of iteration 5; available: \[0\]"):
        AutoBridge.export_ckpt(ckpt, tmp_path / "out", iteration=5)
    assert not (tmp_path / "out").exists()


def test_export_of_a_checkpoint_that_does_not_fit_the_config(qwen2_folder, llama_folder, tmp_path):
    ckpt = AutoBridge.import_ckpt(qwen2_folder, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"checkpoint .*iter_0000000 does not match .*llama/config\.json: "
                                         r"missing tensors: output_layer\.weight"):
        AutoBridge.export_ckpt(ckpt, tmp_path / "out", source=llama_folder)
    assert not (tmp_path / "out").exists()


def test_weights_free_folder_gives_a_provider_but_no_weights(qwen2_folder, tmp_path):
    source = tmp_path / "config_only"
    source.mkdir()
    shutil.copy(qwen2_folder / "config.json", source)
    bridge = AutoBridge.from_hf_pretrained(source)
    assert bridge.to_megatron_provider(load_weights=False).hidden_size == 64
    with pytest.raises(ValueError, match="holds no weights"):
        bridge.to_megatron_provider()
