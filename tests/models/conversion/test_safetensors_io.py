"""Our streaming safetensors reader and writer agree with the `safetensors` library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.bridge.models.conversion.safetensors_io import (
    SafetensorsReader,
    TensorSpec,
    parse_size,
    plan_shards,
    write_safetensors_shards,
)

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "scalar": torch.tensor(7, dtype=torch.int64),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
    "mask": torch.tensor([True, False, True]),
}


def specs() -> list[tuple[str, TensorSpec]]:
    return [(name, TensorSpec(tuple(t.shape), t.dtype)) for name, t in TENSORS.items()]


def test_reader_reads_what_the_library_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "x.safetensors", metadata={"format": "pt"})
    reader = SafetensorsReader(tmp_path / "x.safetensors")
    assert reader.metadata == {"format": "pt"}
    for name, tensor in TENSORS.items():
        assert reader.specs[name] == TensorSpec(tuple(tensor.shape), tensor.dtype)
        assert torch.equal(reader.read(name), tensor)


@pytest.mark.parametrize(("max_size", "files"), [(10**9, 1), (16, 3)])
def test_library_reads_what_we_wrote(tmp_path, max_size, files):
    names = write_safetensors_shards(tmp_path, specs(), iter(TENSORS.items()), max_size)
    assert len(names) == files
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    if files > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(TENSORS) and index["metadata"]["total_size"] == 48 + 10 + 8 + 3


def test_writer_refuses_a_tensor_out_of_plan(tmp_path):
    wrong = iter([("a", TENSORS["a"].double())])
    with pytest.raises(ValueError, match=r"expected tensor a \(3, 4\) torch.float32, got a \(3, 4\) torch.float64"):
        write_safetensors_shards(tmp_path, specs()[:1], wrong, 10**9)


def test_shards_keep_order_and_give_big_tensors_their_own():
    plan = plan_shards([("x", TensorSpec((10,), torch.float32)), ("big", TensorSpec((100,), torch.float32)),
                        ("y", TensorSpec((2,), torch.float32)), ("z", TensorSpec((2,), torch.float32))], 64)
    assert [[name for name, _ in shard] for shard in plan] == [["x"], ["big"], ["y", "z"]]


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("40KB", 40_000),
                                            (1234, 1234), ("2.5 GB", 2_500_000_000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "5XB", "-1GB", 0, "0"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


def test_truncated_or_inconsistent_files_are_refused(tmp_path):
    save_file(TENSORS, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a valid safetensors file: tensor .* offsets"):
        SafetensorsReader(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than its 8-byte header length"):
        SafetensorsReader(tmp_path / "tiny.safetensors")
