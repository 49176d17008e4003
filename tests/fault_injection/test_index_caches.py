"""Damaged sample-index caches: every kind of damage is found on load and the cache rebuilt, or refused by name.

Each test builds real indices on disk, damages one cached `.npy` the way a crash, a full disk, a
stray copy or a hand edit would, and builds again: the damage must be named in a warning, the
file replaced (atomically: no temporary file is left) by one that loads and equals a fresh build,
and the samples must be the ones of an undamaged run. Where the file cannot be replaced, loading
stops with a `DatasetError` naming it. Under torchrun rank 0 builds and repairs while rank 1 waits
and loads.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron.bridge.data import index_cache
from megatron.bridge.data.builder import build_gpt_datasets
from megatron.bridge.data.gpt_dataset import GPTDataset, SampleOptions
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter
from megatron.bridge.training.config import GPTDatasetConfig

EOD = 999
LENGTHS = [5, 12, 0, 3, 9, 1, 7, 20, 4, 6, 30, 2]


def write_corpus(prefix: str, lengths: list[int] = LENGTHS, base: int = 0) -> str:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for k, n in enumerate(lengths):
            writer.add_document(np.arange(n, dtype=np.int64) % 90 + base + k)
    return prefix


def build(prefix: str, cache: str) -> GPTDataset:
    return GPTDataset(IndexedDataset(prefix), split="train", document_range=(0, len(LENGTHS)), num_samples=25,
                      options=SampleOptions(seq_length=7, seed=11, eod=EOD), cache_dir=cache)


def cached_file(cache: str, name: str) -> str:
    (path,) = glob.glob(os.path.join(cache, f"*_{name}.npy"))
    return path


def overwrite(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def resave(change):
    """A damage that saves a changed copy of the array as a well-formed .npy."""
    def damage(path: str) -> None:
        array = np.array(np.load(path))
        np.save(path, change(array), allow_pickle=True)
    return damage


def set_item(index, value):
    def change(array):
        array[index] = value
        return array
    return change


def as_symlink_to_dev_zero(path: str) -> None:
    os.remove(path)
    os.symlink("/dev/zero", path)


def swap_rows(array):
    array[[1, 3]] = array[[3, 1]]
    return array


DAMAGE = {
    "truncated": (lambda p: overwrite(p, Path(p).read_bytes()[: os.path.getsize(p) // 2]), "unreadable"),
    "empty": (lambda p: overwrite(p, b""), "not a .npy file (0 bytes)"),
    "header only": (lambda p: overwrite(p, Path(p).read_bytes()[:70]), "unreadable"),
    "garbage": (lambda p: overwrite(p, b"not an array\n" * 20), "not a .npy file"),
    "trailing bytes": (lambda p: overwrite(p, Path(p).read_bytes() + b"\0" * 16), "bytes where its header describes"),
    "wrong dtype": (resave(lambda a: a.astype(np.int64)), "dtype int64, expected int32"),
    "wrong shape": (resave(lambda a: a[:-1]), "shape"),
    "transposed": (resave(lambda a: np.ascontiguousarray(a.T)), "shape"),
    "offset too large": (resave(set_item((4, 1), 10**6)), "value 1000000 in column 1 is outside"),
    "position past the documents": (resave(set_item((5, 0), 10**6)), "value 1000000 in column 0 is outside"),
    "negative": (resave(set_item((2, 1), -3)), "value -3 in column 1 is outside"),
    "samples out of order": (resave(swap_rows), "rows do not increase"),
    "pickled objects": (resave(lambda a: np.array([{"rows": a.tolist()}], dtype=object)), "unreadable"),
    "symlink to /dev/zero": (as_symlink_to_dev_zero, "not a regular file"),
    "missing": (os.remove, "missing (the cache is incomplete)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_sample_index_is_rebuilt(tmp_path, kind):
    prefix, cache = write_corpus(str(tmp_path / "corpus")), str(tmp_path / "cache")
    fresh = build(prefix, cache)
    expected = {name: np.array(getattr(fresh, attr)) for name, attr in
                (("doc_idx", "document_index"), ("sample_idx", "sample_index"), ("shuffle_idx", "shuffle_index"))}
    samples = [fresh.packed_tokens(i).tolist() for i in range(len(fresh))]
    path = cached_file(cache, "sample_idx")
    damage, fragment = DAMAGE[kind]
    damage(path)

    with pytest.warns(UserWarning, match="rebuilt the damaged dataset index cache") as caught:
        repaired = build(prefix, cache)
    message = str(caught[0].message)
    assert path in message and fragment in message, message
    assert repaired.index_source == "rebuilt"
    assert [repaired.packed_tokens(i).tolist() for i in range(len(repaired))] == samples
    assert not os.path.islink(path) and np.array_equal(np.load(path, allow_pickle=False), expected["sample_idx"])
    assert not glob.glob(os.path.join(cache, "*.tmp-*"))
    again = build(prefix, cache)
    assert again.index_source == "loaded"
    for name, attr in (("doc_idx", "document_index"), ("shuffle_idx", "shuffle_index")):
        assert np.array_equal(getattr(again, attr), expected[name])


@pytest.mark.parametrize(("name", "damage", "fragment"), [
    ("doc_idx", resave(set_item(0, len(LENGTHS))), f"value {len(LENGTHS)} in column 0 is outside [0, 11]"),
    ("doc_idx", resave(lambda a: a.astype(np.uint16)), "dtype uint16, expected int32"),
    ("shuffle_idx", resave(set_item(0, 10**5)), "value 100000 in column 0 is outside"),
    ("shuffle_idx", DAMAGE["truncated"][0], "unreadable"),
])
def test_every_sample_index_array_is_checked(tmp_path, name, damage, fragment):
    prefix, cache = write_corpus(str(tmp_path / "corpus")), str(tmp_path / "cache")
    samples = [t.tolist() for t in map(build(prefix, cache).packed_tokens, range(25))]
    path = cached_file(cache, name)
    damage(path)
    with pytest.warns(UserWarning, match=rf"rebuilt the damaged dataset index cache {path} \(.*{re.escape(fragment)}"):
        repaired = build(prefix, cache)
    assert [t.tolist() for t in map(repaired.packed_tokens, range(25))] == samples


def blend_config(tmp_path) -> GPTDatasetConfig:
    a = write_corpus(str(tmp_path / "a"))
    b = write_corpus(str(tmp_path / "b"), LENGTHS[::-1], base=100)
    return GPTDatasetConfig(seq_length=7, random_seed=2, blend=["30", a, "70", b], split="1",
                            path_to_cache=str(tmp_path / "cache"))


def swap_numbers_of_one_dataset(path: str) -> None:
    numbers = np.array(np.load(path))
    which = np.load(path.replace("blend_sample_idx", "blend_dataset_idx"))
    first, second = np.flatnonzero(which == 1)[:2]
    numbers[[first, second]] = numbers[[second, first]]  # still in range, but out of blend order
    np.save(path, numbers)


@pytest.mark.parametrize(("name", "damage", "fragment"), [
    ("blend_dataset_idx", DAMAGE["truncated"][0], "unreadable"),
    ("blend_dataset_idx", resave(set_item(3, 7)), "value 7 in column 0 is outside [0, 1]"),
    ("blend_sample_idx", resave(set_item(0, -1)), "value -1 in column 0 is outside"),
    ("blend_sample_idx", swap_numbers_of_one_dataset, "not numbered in blend order"),
    ("token_range", DAMAGE["empty"][0], "not a .npy file"),
])
def test_damaged_blend_and_token_range_caches_are_rebuilt(tmp_path, name, damage, fragment):
    cfg = blend_config(tmp_path)
    train, _, _ = build_gpt_datasets(cfg, num_samples=(40, 0, 0), vocab_size=1000, eod=EOD)
    samples = [train[i]["tokens"].tolist() for i in range(len(train))]
    path = sorted(glob.glob(os.path.join(str(tmp_path / "cache"), f"*_{name}.npy")))[0]
    damage(path)
    with pytest.warns(UserWarning, match="rebuilt the damaged dataset index cache") as caught:
        repaired, _, _ = build_gpt_datasets(cfg, num_samples=(40, 0, 0), vocab_size=1000, eod=EOD)
    assert any(path in str(w.message) and fragment in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert [repaired[i]["tokens"].tolist() for i in range(len(repaired))] == samples


def test_damaged_cache_that_cannot_be_replaced_is_refused_by_name(tmp_path):
    prefix, cache = write_corpus(str(tmp_path / "corpus")), str(tmp_path / "cache")
    build(prefix, cache)
    path = cached_file(cache, "shuffle_idx")
    os.remove(path)
    os.mkdir(path)  # a directory where the file belongs: nothing can be renamed over it, not even by root
    with pytest.raises(DatasetError, match=rf"the dataset index cache {path} is damaged \(not a regular file\) "
                                           r"and cannot be replaced .*set dataset.path_to_cache"):
        build(prefix, cache)


def test_damaged_cache_in_a_read_only_directory_is_refused_by_name(tmp_path, monkeypatch):
    prefix, cache = write_corpus(str(tmp_path / "corpus")), str(tmp_path / "cache")
    build(prefix, cache)
    path = cached_file(cache, "doc_idx")
    overwrite(path, b"")
    os.chmod(cache, 0o555)
    if os.geteuid() == 0:  # root ignores the mode bits (CI runs as root): refuse as the kernel refuses everyone else
        def refuse(src, dst):
            raise PermissionError(13, "Permission denied", dst)
        monkeypatch.setattr(index_cache.os, "replace", refuse)
    try:
        with pytest.raises(DatasetError, match=rf"{path} is damaged \(not a .npy file \(0 bytes\)\) and cannot be "
                                               "replaced"):
            build(prefix, cache)
    finally:
        os.chmod(cache, 0o755)


WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch.distributed as dist
    from megatron.bridge.data.builder import build_gpt_datasets
    from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDatasetWriter
    from megatron.bridge.training.config import GPTDatasetConfig

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prefix = os.path.join(out, "corpus")
    if rank == 0:
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for k in range(40):
                writer.add_document(np.arange(5 + k % 13) + k)
    dist.barrier()
    cfg = GPTDatasetConfig(seq_length=16, random_seed=3, blend=[prefix], split="1")

    def load():
        train, _, _ = build_gpt_datasets(cfg, num_samples=(64, 0, 0), vocab_size=1000, eod=999)
        return [train.index_source, [train[i]["tokens"].tolist() for i in range(3)]]

    record = {"fresh": load()}
    dist.barrier()
    if rank == 0:
        (path,) = [os.path.join(prefix + "_cache", f) for f in os.listdir(prefix + "_cache") if "shuffle" in f]
        with open(path, "r+b") as f:
            f.truncate(100)
    dist.barrier()
    record["damaged"] = load()
    try:  # rank 0 fails inside the build; rank 1 must not hang waiting for it, and fails the same way
        build_gpt_datasets(cfg, num_samples=(64, 0, 0), vocab_size=10, eod=9)
    except DatasetError as err:
        record["error"] = str(err).split(":")[0]
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_under_torchrun_rank_zero_builds_and_repairs_while_the_others_load(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (rank0["fresh"][0], rank1["fresh"][0]) == ("built", "loaded")
    assert (rank0["damaged"][0], rank1["damaged"][0]) == ("rebuilt", "loaded")
    assert rank0["fresh"][1] == rank1["fresh"][1] == rank0["damaged"][1] == rank1["damaged"][1]
    assert rank0["error"] == rank1["error"] and "holds token id" in rank0["error"]
    assert "rebuilt the damaged dataset index cache" in result.stderr
