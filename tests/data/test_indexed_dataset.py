"""The MMIDIDX format, checked byte by byte against the spec, and every way a pair of files can be bad."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from megatron.bridge.data import indexed_dataset
from megatron.bridge.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter, optimal_dtype

DOCS = [[5, 6, 7], [1000, 2], [], [42] * 5]


def spec_index(code: int, lengths: list[int], itemsize: int, document_indices: list[int]) -> bytes:
    """The .idx bytes the spec prescribes, written out field by field with struct."""
    pointers, offset = [], 0
    for length in lengths:
        pointers.append(offset)
        offset += length * itemsize
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(document_indices))
        + struct.pack(f"<{len(lengths)}i", *lengths)
        + struct.pack(f"<{len(pointers)}q", *pointers)
        + struct.pack(f"<{len(document_indices)}q", *document_indices)
    )


@pytest.mark.parametrize(("dtype", "code", "fmt"), [(np.uint16, 8, "H"), (np.int32, 4, "i"), (np.int64, 5, "q"),
                                                    (np.uint8, 1, "B")])
def test_written_files_match_the_spec_byte_for_byte(tmp_path, dtype, code, fmt):
    docs = [[t % 200 for t in doc] for doc in DOCS] if dtype == np.uint8 else DOCS
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    lengths = [len(doc) for doc in docs]
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == spec_index(code, lengths, itemsize, [0, 1, 2, 3, 4])
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == b"".join(struct.pack(f"<{len(doc)}{fmt}", *doc) for doc in docs)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporary files left behind


def test_reads_files_built_by_hand_from_the_spec(tmp_path):
    # As Megatron-LM writes them: int32 tokens, and one document made of two sequences.
    sequences = [[10, 11, 12], [13], [20, 21]]
    prefix = str(tmp_path / "megatron")
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            f.write(struct.pack(f"<{len(seq)}i", *seq))
    with open(prefix + ".idx", "wb") as f:
        f.write(spec_index(4, [3, 1, 2], 4, [0, 2, 3]))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 6
    assert [ds.get(i).tolist() for i in range(3)] == sequences
    assert ds.get(0, offset=1).tolist() == [11, 12]
    assert ds.get(0, offset=1, length=1).tolist() == [11]
    assert ds.document_indices.tolist() == [0, 2, 3]
    with pytest.raises(IndexError):
        ds.get(2, offset=1, length=2)


def test_round_trip_and_token_range_in_chunks(write_dataset, monkeypatch):
    prefix = write_dataset(DOCS)
    ds = IndexedDataset(prefix)
    assert [ds.get(i).tolist() for i in range(len(ds))] == DOCS
    monkeypatch.setattr(indexed_dataset, "SCAN_CHUNK_TOKENS", 3)  # several chunks over the 10 tokens
    assert ds.token_range() == (2, 1000)


def test_optimal_dtype_switches_to_int32_at_65500():
    assert optimal_dtype(50_000) == np.uint16 and optimal_dtype(65_499) == np.uint16
    assert optimal_dtype(65_500) == np.int32 and optimal_dtype(151_936) == np.int32


def test_writer_rejects_ids_its_dtype_cannot_hold(tmp_path):
    writer = IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16)
    with pytest.raises(ValueError, match="do not fit uint16"):
        writer.add_document([1, 70_000])
    writer.discard()


def test_an_interrupted_writer_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(str(tmp_path / "ds")) as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_pickled_dataset_carries_no_tokens(write_dataset):
    prefix = write_dataset([list(range(1000))] * 50)
    ds = IndexedDataset(prefix)
    _ = ds.get(3)  # map the .bin first
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert pickle.loads(blob).get(49).tolist() == list(range(1000))


# ---------------------------------------------------------------------------------------------- bad files


def _rewrite_idx(prefix: str, edit) -> None:
    with open(prefix + ".idx", "rb") as f:
        data = bytearray(f.read())
    with open(prefix + ".idx", "wb") as f:
        f.write(bytes(edit(data)))


def _set(data: bytearray, offset: int, value: bytes) -> bytearray:
    data[offset : offset + len(value)] = value
    return data


BAD_INDEX_CASES = [
    ("bad_magic", lambda d: _set(d, 0, b"XXIDIDX\x00\x00"), ["corrupt index", "ds.idx", "magic"]),
    ("version_2", lambda d: _set(d, 9, struct.pack("<Q", 2)), ["ds.idx", "version 2", "only version 1"]),
    ("dtype_code_9", lambda d: _set(d, 17, b"\x09"), ["ds.idx", "dtype code 9", "8 uint16"]),
    ("truncated_arrays", lambda d: d[:-5], ["ds.idx", "truncated"]),
    ("truncated_header", lambda d: d[:20], ["ds.idx", "shorter than the 34-byte header"]),
    ("sequence_count_too_big", lambda d: _set(d, 18, struct.pack("<Q", 99)), ["ds.idx", "99 sequences"]),
    ("negative_length", lambda d: _set(d, 34, struct.pack("<i", -3)), ["ds.idx", "negative sequence length"]),
    ("document_index_not_from_0", lambda d: _set(d, len(d) - 40, struct.pack("<q", 1)), ["ds.idx", "start at 0"]),
]


@pytest.mark.parametrize(("edit", "fragments"), [c[1:] for c in BAD_INDEX_CASES], ids=[c[0] for c in BAD_INDEX_CASES])
def test_corrupt_index_is_reported_with_the_file(write_dataset, edit, fragments):
    prefix = write_dataset(DOCS)
    _rewrite_idx(prefix, edit)
    with pytest.raises(DatasetError) as info:
        IndexedDataset(prefix)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_bin_size_disagreeing_with_the_index_is_reported(write_dataset, change):
    prefix = write_dataset(DOCS)
    with open(prefix + ".bin", "r+b") as f:
        if change == "truncate":
            f.truncate(os.path.getsize(prefix + ".bin") - 2)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\x00\x00")
    with pytest.raises(DatasetError, match=r"ds\.bin holds \d+ bytes but .*ds\.idx describes 20 bytes \(10 tokens"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file_is_named(write_dataset, missing):
    prefix = write_dataset(DOCS)
    os.remove(prefix + missing)
    with pytest.raises(DatasetError, match=rf"ds\{missing} does not exist"):
        IndexedDataset(prefix)
