"""Hostile Hugging Face folders: config.json values, index paths, symlinks and safetensors headers.

Each must be refused with a `UserError` naming the file (and the key or entry), before anything is
built or written, without reading outside the folder and without unbounded memory or time.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from megatron.bridge import AutoBridge
from megatron.bridge.convert import main as convert_main
from megatron.bridge.models.conversion.hf_folder import MAX_JSON_BYTES
from megatron.bridge.models.conversion.safetensors_io import (
    INDEX_FILE,
    SafetensorsReader,
    TensorSpec,
    write_safetensors_shards,
)
from megatron.bridge.models.registry import hf_tensor_shapes, provider_from_hf_config
from megatron.bridge.utils.errors import UserError

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32", "hidden_act": "silu",
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def write_folder(folder: Path, config: dict, *, max_shard_size: int) -> Path:
    """A Hugging Face folder for `config`: config.json, a tokenizer file, and weights (ones)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    shapes = hf_tensor_shapes(provider_from_hf_config(config))
    specs = [(name, TensorSpec(tuple(shape), torch.float32)) for name, shape in shapes.items()]
    write_safetensors_shards(folder, specs, ((name, torch.ones(spec.shape)) for name, spec in specs),
                             max_shard_size)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A valid folder with an index and several shards (read-only: tests copy it)."""
    return write_folder(tmp_path_factory.mktemp("hf") / "sharded", CONFIG, max_shard_size=8000)


@pytest.fixture
def source(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "src"))


def edit_json(path: Path, **changes) -> dict:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return data


def assert_refused(folder: Path, match: str) -> UserError:
    """Opening and importing both fail with a UserError matching `match`; nothing is written."""
    before = sorted(p.name for p in folder.parent.iterdir())
    with pytest.raises(UserError, match=match) as info:
        AutoBridge.from_hf_pretrained(folder)
    with pytest.raises(UserError, match=match):
        AutoBridge.import_ckpt(folder, folder.parent / "ckpt")
    assert sorted(p.name for p in folder.parent.iterdir()) == before
    return info.value


def test_the_fixture_folder_is_valid(source):
    model = AutoBridge.from_hf_pretrained(source).to_megatron_model()[0]
    assert all(torch.all(p == 1) for p in model.parameters())


# ------------------------------------------------------------------------------------------ config.json

HOSTILE_CONFIG = [
    ({"num_hidden_layers": 100000}, r"num_hidden_layers=100000 is invalid: a positive integer up to 1024"),
    ({"num_hidden_layers": 10**9}, r"num_hidden_layers=1000000000 is invalid"),
    ({"num_hidden_layers": 1e9}, r"num_hidden_layers=1000000000\.0 is invalid"),
    ({"num_hidden_layers": "2"}, r"num_hidden_layers='2' is invalid"),
    ({"num_hidden_layers": True}, r"num_hidden_layers=True is invalid"),
    ({"num_hidden_layers": None}, r"num_hidden_layers=None is invalid"),
    # Within the bound but not what the weights hold: refused from the headers, before building 1000 layers.
    ({"num_hidden_layers": 1000}, r"num_hidden_layers=1000 does not match weights in .*, which holds 2 layers"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers=3 does not match weights in .*, which holds 2 layers"),
    ({"hidden_size": -32}, r"hidden_size=-32 is invalid: a positive integer"),
    ({"hidden_size": 2**40}, r"hidden_size=1099511627776 is invalid"),
    ({"intermediate_size": 10**30}, r"intermediate_size=10{30} is invalid"),
    ({"vocab_size": 0}, r"vocab_size=0 is invalid"),
    ({"max_position_embeddings": 2**40}, r"max_position_embeddings=1099511627776 is invalid"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1}, r"hidden_size=32 is invalid: a multiple of "
                                                           r"num_attention_heads=3"),
    ({"num_attention_heads": 64, "num_key_value_heads": 1}, r"hidden_size=32 is invalid: a multiple of "
                                                            r"num_attention_heads=64"),
    ({"num_attention_heads": 32, "num_key_value_heads": 32}, r"hidden_size=32 is invalid: an even head dimension"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3 is invalid: a divisor of num_attention_heads=4"),
    ({"num_key_value_heads": 8}, r"num_key_value_heads=8 is invalid: a divisor of num_attention_heads=4"),
    ({"head_dim": 7}, r"head_dim=7 is invalid: an even head dimension"),
    ({"head_dim": "8"}, r"head_dim='8' is invalid"),
    ({"rope_theta": "abc"}, r"rope_theta='abc' is invalid: a positive number"),
    ({"rope_theta": float("nan")}, r"rope_theta=nan is invalid: a positive number"),
    ({"rope_theta": float("inf")}, r"rope_theta=inf is invalid"),
    ({"rope_theta": -1}, r"rope_theta=-1 is invalid"),
    ({"rope_theta": 10**400}, r"rope_theta=10+\.\.\. \(401 characters\) is invalid: a positive number"),
    ({"rope_scaling": [1, 2]}, r"rope_scaling=\[1, 2\] is invalid: an object \(or null\)"),
    ({"rope_scaling": {"rope_type": 5}}, r"rope_scaling\.rope_type=5 is invalid: a string"),
    ({"rope_scaling": {**LLAMA3, "factor": "x"}}, r"rope_scaling\.factor='x' is invalid: a positive number"),
    ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 3.5}},
     r"rope_scaling\.original_max_position_embeddings=3\.5 is invalid"),
    ({"rope_scaling": {"rope_type": "llama3"}}, r"llama3 rope scaling needs factor"),
    ({"rope_scaling": {"partial_rotary_factor": "half"}}, r"rope_scaling\.partial_rotary_factor='half' is invalid"),
    ({"rope_parameters": "fast", "rope_theta": None}, r"rope_parameters='fast' is invalid: an object"),
    ({"rope_parameters": {"rope_theta": [1]}, "rope_theta": None}, r"rope_parameters\.rope_theta=\[1\] is invalid"),
    ({"rms_norm_eps": "small"}, r"rms_norm_eps='small' is invalid: a positive number"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps=0 is invalid"),
    ({"initializer_range": [0.02]}, r"initializer_range=\[0\.02\] is invalid"),
    ({"attention_dropout": 1.5}, r"attention_dropout=1\.5 is invalid: a number in \[0, 1\)"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' is invalid: true or false"),
    ({"attention_bias": 1, "mlp_bias": 1}, r"attention_bias=1 is invalid: true or false"),
    ({"use_sliding_window": "no"}, r"use_sliding_window='no' is invalid"),
    ({"hidden_act": ["silu"]}, r"hidden_act=\['silu'\] is invalid: a string"),
    ({"torch_dtype": "int8"}, r"torch_dtype='int8' is invalid: one of float32, bfloat16, float16"),
    ({"torch_dtype": 5}, r"torch_dtype=5 is invalid: a string"),
    ({"architectures": [{}]}, r"architectures=\[\{\}\] is invalid: a list of class names"),
    ({"architectures": 5}, r"architectures=5 is invalid"),
    ({"architectures": ["X" * 10**5]}, r"architecture X+\.\.\. is not supported"),
]


@pytest.mark.parametrize(("changes", "match"), HOSTILE_CONFIG, ids=[str(c)[:60] for c, _ in HOSTILE_CONFIG])
def test_hostile_config_values_are_refused_naming_file_and_key(source, changes, match):
    edit_json(source / "config.json", **changes)
    error = assert_refused(source, r"config\.json.*" + match)
    assert len(str(error)) < 1000  # nothing unbounded is echoed


def test_config_json_that_is_not_an_object_or_too_deep_or_huge(source):
    config = source / "config.json"
    for text, match in [("[1, 2]", "is not a JSON object"), ("[" * 100_000 + "]" * 100_000, "cannot read"),
                        ('{"vocab_size": ' + "9" * 5000 + "}", "cannot read"), (b"\xff\xfe{}", "cannot read")]:
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert_refused(source, rf"{config}.*{match}|{match} {config}")
    with open(config, "wb") as f:  # sparse: reading it whole would take the limit and more in memory
        f.truncate(MAX_JSON_BYTES + 1)
    assert_refused(source, r"config\.json: larger than 64 MiB")


def test_config_json_that_is_a_pipe_is_refused_without_blocking(source):
    (source / "config.json").unlink()
    os.mkfifo(source / "config.json")
    assert_refused(source, r"config\.json: not a regular file")


# -------------------------------------------------------------------------------- index and symlinks


@pytest.fixture
def outside(sharded, tmp_path) -> Path:
    """A valid shard copied out of the folder: an escaping path that does lead to real tensors."""
    first = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]["model.embed_tokens.weight"]
    return Path(shutil.copy(sharded / first, tmp_path / "outside.safetensors"))


def embedding_shard(folder: Path) -> str:
    """The shard the index places the embedding in."""
    return json.loads((folder / INDEX_FILE).read_text())["weight_map"]["model.embed_tokens.weight"]


def point_tensor_at(folder: Path, file_name: object) -> None:
    """Make the index place the embedding's shard (all its tensors) at `file_name`."""
    index = json.loads((folder / INDEX_FILE).read_text())
    shard = embedding_shard(folder)
    index["weight_map"] = {k: (file_name if v == shard else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize(("entry", "match"), [
    ("../outside.safetensors", r"'\.\./outside\.safetensors' is not inside .*absolute paths and '\.\.' are refused"),
    ("../../../../../../../../etc/passwd", r"'(\.\./)+etc/passwd' is not inside"),
    ("/etc/passwd", r"'/etc/passwd' is not inside"),
    ("OUTSIDE", r"'/.*/outside\.safetensors' is not inside"),  # a real shard's absolute path
    ("sub/../../outside.safetensors", r"'sub/\.\./\.\./outside\.safetensors' is not inside"),
    (5, r"5 is not a file name"),
    (["a"], r"\['a'\] is not a file name"),
    ("", r"'' is not a file name"),
])
def test_index_entries_leading_out_of_the_folder_are_refused(source, outside, entry, match):
    point_tensor_at(source, str(outside) if entry == "OUTSIDE" else entry)
    assert_refused(source, rf"{INDEX_FILE} weight_map\['model\.embed_tokens\.weight'\]: {match}")


def test_index_without_a_weight_map_object(source):
    edit_json(source / INDEX_FILE, weight_map=["model-00001-of-00002.safetensors"])
    assert_refused(source, rf"{INDEX_FILE} has no weight_map")


def test_a_shard_symlinked_out_of_the_folder_is_refused(source, outside):
    shard = embedding_shard(source)
    (source / shard).unlink()
    (source / shard).symlink_to(outside)
    assert_refused(source, rf"{shard}' is a symlink leading out of .*outside\.safetensors")


@pytest.mark.parametrize("name", ["config.json", INDEX_FILE])
def test_config_or_index_symlinked_out_of_the_folder_is_refused(source, tmp_path, name):
    target = Path(shutil.copy(source / name, tmp_path / f"elsewhere_{name}"))
    (source / name).unlink()
    (source / name).symlink_to(target)
    assert_refused(source, rf"'{name}' is a symlink leading out of")


def test_a_tokenizer_file_symlinked_out_is_refused_and_never_copied(source, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (source / "tokenizer_config.json").symlink_to(secret)
    bridge = AutoBridge.from_hf_pretrained(source)  # the weights are fine; the copy is what is refused
    with pytest.raises(UserError, match=r"'tokenizer_config\.json' is a symlink leading out of .*id_rsa"):
        AutoBridge.import_ckpt(source, tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"tokenizer_config\.json' is a symlink leading out"):
        bridge.save_hf_pretrained(bridge.to_megatron_model(), tmp_path / "out")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_symlinks_that_stay_inside_the_folder_are_followed(source):
    shard = embedding_shard(source)
    (source / "real").mkdir()
    (source / shard).rename(source / "real" / "shard.safetensors")
    (source / shard).symlink_to(Path("real") / "shard.safetensors")
    assert AutoBridge.from_hf_pretrained(source).to_megatron_model()[0].embedding.weight.eq(1).all()


def test_the_hub_cache_layout_is_read(sharded, tmp_path):
    """huggingface_hub keeps `<repo>/snapshots/<hash>/<file>` as symlinks to `<repo>/blobs/<sha>`."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(sharded.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    model = AutoBridge.from_hf_pretrained(snapshot).to_megatron_model()[0]
    assert all(torch.all(p == 1) for p in model.parameters())
    (tmp_path / "secret").write_text("PRIVATE")
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "secret")  # out of the repository: refused even here
    with pytest.raises(UserError, match="symlink leading out"):
        AutoBridge.import_ckpt(snapshot, tmp_path / "ckpt")


# ------------------------------------------------------------------------------------ safetensors headers


def raw_safetensors(path: Path, header: object, data: bytes = b"", *, header_len: int | None = None) -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE_HEADERS = [
    ({"a": entry()}, 16, 2**63, r"header length 9223372036854775808 exceeds the file's size"),
    ({"a": entry()}, 8, 10**6, r"header length 1000000 exceeds the file's size"),
    ({"a": entry(offsets=(0, 10**12))}, 8, None, r"tensor 'a': offsets \[0, 1000000000000\] do not fit"),
    ({"a": entry(offsets=(8, 16))}, 8, None, r"tensor 'a': offsets \[8, 16\] do not fit"),
    ({"a": entry(), "b": entry(shape=(1,), offsets=(4, 8))}, 8, None, r"tensors 'a' and 'b' share bytes 4\.\.8"),
    ({"a": entry(dtype="F4")}, 8, None, r"tensor 'a': dtype 'F4' is not one of F64, F32"),
    ({"a": entry(dtype=None)}, 8, None, r"tensor 'a': dtype None is not one of"),
    ({"a": entry(shape=(2.0,))}, 8, None, r"tensor 'a': shape \[2\.0\] is not a list of non-negative integers"),
    ({"a": entry(shape=(-2,))}, 8, None, r"tensor 'a': shape \[-2\] is not a list"),
    ({"a": entry(shape=(True, 2))}, 8, None, r"tensor 'a': shape \[True, 2\] is not a list"),
    ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, 8, None, r"tensor 'a': shape 2 is not a list"),
    ({"a": entry(offsets=(0,))}, 8, None, r"tensor 'a': data_offsets \[0\] is not a pair"),
    ({"a": entry(offsets=("0", "8"))}, 8, None, r"tensor 'a': data_offsets \['0', '8'\] is not a pair"),
    ({"a": 5}, 8, None, r"tensor 'a': 5 is not an object"),
    ({"__metadata__": ["x"], "a": entry()}, 8, None, r"__metadata__=\['x'\] is not an object of strings"),
    ({"__metadata__": {"format": 1}, "a": entry()}, 8, None, r"__metadata__=\{'format': 1\}"),
    (b"[" * 100_000 + b"]" * 100_000, 0, None, r"header holds an unreadable value"),
    (b'{"a": ' + b"7" * 5000 + b"}", 0, None, r"header holds an unreadable value"),
    (b"\xff\xfe\x00", 0, None, r"header is not JSON"),
    ([1, 2], 0, None, r"header is not a JSON object"),
    ({"x" * 10**6: entry(dtype="F4")}, 8, None, r"tensor 'x+\.\.\. \(1000002 characters\): dtype 'F4'"),
]


@pytest.mark.parametrize(("header", "data_bytes", "header_len", "match"), HOSTILE_HEADERS,
                         ids=[str(h)[:50] for h, *_ in HOSTILE_HEADERS])
def test_hostile_safetensors_headers_are_refused_naming_the_file(tmp_path, header, data_bytes, header_len, match):
    path = raw_safetensors(tmp_path / "x.safetensors", header, bytes(data_bytes), header_len=header_len)
    with pytest.raises(UserError, match=rf"x\.safetensors is not a valid safetensors file: {match}") as info:
        SafetensorsReader(path)
    assert len(str(info.value)) < 1000


def test_a_header_of_gigabytes_is_refused_unread(tmp_path):
    path = raw_safetensors(tmp_path / "x.safetensors", {"a": entry()}, header_len=3 * 10**9)
    with open(path, "r+b") as f:  # sparse: the file really is that large, without taking the disk
        f.truncate(4 * 10**9)
    with pytest.raises(UserError, match=r"x\.safetensors is not a valid safetensors file: header length 3000000000 "
                                         r"exceeds the 100000000-byte limit"):
        SafetensorsReader(path)


def test_a_hostile_shard_is_refused_through_the_bridge(source):
    shard = embedding_shard(source)
    raw_safetensors(source / shard, {"model.embed_tokens.weight": entry(), "b": entry(offsets=(4, 12))}, bytes(12))
    assert_refused(source, rf"{shard} is not a valid safetensors file: tensors 'model\.embed_tokens\.weight' and 'b' "
                           r"share bytes 4\.\.8")


def test_tensor_names_from_headers_are_not_echoed_unbounded(source, tmp_path):
    shard = embedding_shard(source)
    reader = SafetensorsReader(source / shard)
    long_name = "model.layers.0." + "x" * 10**6
    specs = [*reader.specs.items(), (long_name, TensorSpec((1,), torch.float32))]
    tensors = iter([*((name, reader.read(name)) for name in reader.specs), (long_name, torch.ones(1))])
    write_safetensors_shards(tmp_path, specs, tensors, 10**9)
    shutil.move(tmp_path / "model.safetensors", source / shard)
    index = json.loads((source / INDEX_FILE).read_text())
    index["weight_map"][long_name] = shard
    (source / INDEX_FILE).write_text(json.dumps(index))
    error = assert_refused(source, r"unexpected tensors: model\.layers\.0\.x+\.\.\. \(in model-")
    assert len(str(error)) < 2000


def test_the_convert_command_prints_one_line(source, tmp_path, capsys):
    edit_json(source / "config.json", rope_theta="abc")
    assert convert_main(["import", str(source), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m megatron.bridge.convert: error: ")
    assert "rope_theta='abc' is invalid" in err and "Traceback" not in err
