"""Hugging Face -> ours -> Hugging Face, in memory and through training checkpoints: nothing changes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
import yaml
from hf_tiny import (
    TOKENIZER_FILES,
    assert_same_extras,
    assert_same_tensors,
    build_hf,
    hf_logits,
    hf_tensors,
    qwen2_config,
    save_hf,
    token_ids,
)

from megatron.bridge import AutoBridge
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.convert import main as convert_main
from megatron.bridge.models.conversion.safetensors_io import SafetensorsReader
from megatron.bridge.models.registry import FAMILIES

transformers = pytest.importorskip("transformers")


FAMILY = {family.name: family for family in FAMILIES}


def test_each_familys_name_table_maps_both_ways():
    qwen2, llama, gemma3 = FAMILY["qwen2"], FAMILY["llama"], FAMILY["gemma3"]
    assert qwen2.to_hf_name("layers.3.self_attention.linear_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert llama.to_megatron_name("model.layers.11.mlp.down_proj.weight") == "layers.11.mlp.linear_down.weight"
    assert llama.to_megatron_name("lm_head.weight") == "output_layer.weight"
    assert llama.to_megatron_name("model.layers.0.mlp.fc1.weight") is None
    # One Hugging Face name, two meanings: Llama's pre-MLP norm, Gemma 3's post-attention norm.
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert llama.to_megatron_name(norm) == "layers.0.pre_mlp_layernorm.weight"
    assert gemma3.to_megatron_name(norm) == "layers.0.post_self_attn_layernorm.weight"
    assert gemma3.to_hf_name("layers.0.pre_mlp_layernorm.weight") == "model.layers.0.pre_feedforward_layernorm.weight"
    for family in FAMILIES:
        for mapping in family.name_rows:
            ours = mapping.megatron.replace("{layer}", "7")
            assert family.to_megatron_name(family.to_hf_name(ours)) == ours, family.name
    with pytest.raises(ValueError, match="linear_fc1.*has no Hugging Face equivalent in LlamaForCausalLM"):
        llama.to_hf_name("layers.0.mlp.linear_fc1.weight")
    with pytest.raises(ValueError, match="linear_q.bias.*has no Hugging Face equivalent in Qwen3ForCausalLM"):
        FAMILY["qwen3"].to_hf_name("layers.0.self_attention.linear_q.bias")


@pytest.mark.parametrize("fixture", ["qwen2_folder", "llama_folder"])
def test_save_hf_pretrained_round_trips_bit_for_bit(fixture, request, tmp_path):
    source = request.getfixturevalue(fixture)
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    sharded = fixture == "llama_folder"
    out = bridge.save_hf_pretrained(model, tmp_path / "out", max_shard_size="40KB" if sharded else "5GB")
    assert_same_tensors(source, out)
    assert_same_extras(source, out)
    assert (out / "model.safetensors.index.json").exists() == sharded
    assert (out / "model.safetensors").exists() == (not sharded)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    torch.testing.assert_close(hf_logits(out, vocab), hf_logits(source, vocab), atol=0, rtol=0)


def test_bf16_source_keeps_bf16_and_dtype_can_be_overridden(tmp_path):
    source = save_hf(build_hf(qwen2_config()).to(torch.bfloat16), tmp_path / "bf16")
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    assert next(model[0].parameters()).dtype == torch.float32  # trained in fp32, stored as the source says
    assert_same_tensors(source, bridge.save_hf_pretrained(model, tmp_path / "same"))
    out = bridge.save_hf_pretrained(model, tmp_path / "fp32", dtype=torch.float32)
    assert {t.dtype for t in hf_tensors(out).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_export_hf_weights_streams_copies_in_order(qwen2_folder):
    bridge = AutoBridge.from_hf_pretrained(qwen2_folder)
    model = bridge.to_megatron_model()[0]
    stream = bridge.export_hf_weights(model)
    name, first = next(stream)
    assert name == "model.embed_tokens.weight" and first.device.type == "cpu"
    first.zero_()  # a copy: the model is untouched
    assert model.embedding.weight.abs().sum() > 0
    names = [name] + [n for n, _ in stream]
    assert names[-1] == "model.norm.weight" and "lm_head.weight" not in names  # tied
    assert sorted(names) == sorted(hf_tensors(qwen2_folder))


def test_wrapped_models_export_like_plain_ones(qwen2_folder, tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    bridge = AutoBridge.from_hf_pretrained(qwen2_folder)
    expected = dict(bridge.export_hf_weights(bridge.to_megatron_model()))
    ddp = DistributedDataParallel(bridge.to_megatron_model()[0])
    fsdp = bridge.to_megatron_model()[0]
    for block in fsdp.layers:
        fully_shard(block)
    fully_shard(fsdp)
    assert hasattr(fsdp.embedding.weight, "full_tensor")  # sharded parameters are DTensors
    for wrapped in (ddp, [fsdp]):
        exported = dict(bridge.export_hf_weights(wrapped))
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], v) for k, v in expected.items())
    dist.destroy_process_group()


def test_import_then_export_checkpoint_round_trips(llama_folder, tmp_path):
    ckpt = AutoBridge.import_ckpt(llama_folder, tmp_path / "ckpt")
    iteration = ckpt / "iter_0000000"
    assert (ckpt / checkpoint_io.TRACKER_FILE).read_text().strip() == "0"
    common = json.loads((iteration / "common.json").read_text())
    assert common["format_version"] == 1 and common["train_state"]["step"] == 0
    run_config = yaml.safe_load((iteration / "run_config.yaml").read_text())
    assert run_config["model"]["_target_"].endswith("LlamaModelProvider")
    assert run_config["model"]["rope_scaling"]["rope_type"] == "llama3"
    keys = set(checkpoint_io.read_index(iteration).state_dict_metadata)
    assert keys == {"model." + FAMILY["llama"].to_megatron_name(name) for name in hf_tensors(llama_folder)}
    assert sorted(p.name for p in (iteration / "hf").iterdir()) == sorted(
        ["config.json", "generation_config.json", *TOKENIZER_FILES])

    out = AutoBridge.export_ckpt(ckpt, tmp_path / "hf", max_shard_size="40KB")
    assert_same_tensors(llama_folder, out)
    assert_same_extras(llama_folder, out)


def test_export_without_stored_config_rebuilds_it_from_run_config(llama_folder, llama_model, tmp_path):
    ckpt = AutoBridge.import_ckpt(llama_folder, tmp_path / "ckpt")
    shutil.rmtree(ckpt / "iter_0000000" / "hf")
    # The run's tokenizer lived in hf/: say the run had none (a run with one is test_export_tokenizer's).
    run_config = yaml.safe_load((ckpt / "iter_0000000" / "run_config.yaml").read_text())
    run_config["tokenizer"] = {"tokenizer_type": "NullTokenizer", "vocab_size": 256}
    (ckpt / "iter_0000000" / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    (ckpt / "iter_0000000" / "manifest.json").unlink()  # edited by hand: read it as written before checksums
    out = AutoBridge.export_ckpt(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    # Written as transformers 5 writes it: the RoPE scaling in rope_parameters, the dtype as `dtype`.
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_parameters"]["factor"] == 8.0
    assert config["dtype"] == "float32" and "rope_scaling" not in config and "torch_dtype" not in config
    assert_same_tensors(llama_folder, out)
    with torch.no_grad():
        expected = llama_model(token_ids(256)).logits
    torch.testing.assert_close(hf_logits(out, 256), expected, atol=1e-5, rtol=0)


def test_pickle_weights_are_read_with_weights_only(qwen2_model, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    qwen2_model.config.to_json_file(folder / "config.json")
    state = {k: v for k, v in qwen2_model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    model = AutoBridge.from_hf_pretrained(folder).to_megatron_model()[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids(250)), qwen2_model(token_ids(250)).logits, atol=1e-5, rtol=0)


def test_command_line_import_and_export(qwen2_folder, tmp_path, capsys):
    assert convert_main(["import", str(qwen2_folder), str(tmp_path / "ckpt"), "--dtype", "bf16"]) == 0
    assert convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--iteration", "0"]) == 0
    reader = SafetensorsReader(tmp_path / "hf" / "model.safetensors")
    assert {spec.dtype for spec in reader.specs.values()} == {torch.bfloat16}  # the dtype import stored
    assert convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 1
    assert "not empty" in capsys.readouterr().err
