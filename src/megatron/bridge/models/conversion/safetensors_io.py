"""safetensors files read and written one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
`dtype`, `shape` and `data_offsets` (relative to the end of the header) plus an optional
`__metadata__` dict of strings, then the raw little-endian tensor bytes.

Both directions stream: a tensor is read with `seek` + `readinto` straight into its own storage, and
a file is written by laying out the header from the planned names, shapes and dtypes first, then
appending each tensor's bytes as it arrives. So peak memory is one tensor, not one file. (Memory-
mapping, as `safetensors.safe_open` does, would add every page it touches to the process's resident
set; `safetensors.torch.save_file` would build the whole file's bytes in memory first.)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.utils.errors import ConfigError, short_repr

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "SafetensorsReader",
    "TensorSpec",
    "parse_size",
    "plan_shards",
    "shard_file_names",
    "write_safetensors_shards",
]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that has not been read (or produced) yet."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as `"5GB"` (powers of 10) or `"500MiB"` (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if match and match.group(2).upper() in _SIZE_UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    raise ConfigError(
        f"max_shard_size={short_repr(size)} is invalid: a positive number of bytes or a string like '5GB' or '500MiB'"
    )


class SafetensorsReader:
    """The header of one safetensors file, and its tensors read on request.

    Nothing in the header is trusted: its length must fit the file (and `_MAX_HEADER_BYTES`), every
    entry needs a known dtype, a shape of non-negative integers and offsets inside the data that match
    the shape and overlap no other tensor. Anything else is a `ConversionError` naming the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        self._offsets: dict[str, int] = {}
        self._read_header()

    def _fail(self, why: str) -> ConversionError:
        return ConversionError(f"{self.path} is not a valid safetensors file: {why}")

    def _read_header(self) -> None:
        if self.path.exists() and not self.path.is_file():  # a pipe would block the open below
            raise ConversionError(f"{self.path} is not a regular file")
        try:
            with open(self.path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                size_bytes = f.read(8)
                header_len = struct.unpack("<Q", size_bytes)[0] if len(size_bytes) == 8 else None
                if header_len is not None and header_len <= min(_MAX_HEADER_BYTES, file_size - 8):
                    header_bytes = f.read(header_len)
        except OSError as err:
            raise ConversionError(f"cannot read {self.path}: {err}") from err
        if header_len is None:
            raise self._fail("shorter than its 8-byte header length")
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            limit = "the file's size" if header_len > file_size - 8 else f"the {_MAX_HEADER_BYTES}-byte limit"
            raise self._fail(f"header length {header_len} exceeds {limit} ({file_size} bytes in all)")
        header = self._parse_json(header_bytes)
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        self.metadata = self._parse_metadata(header.pop("__metadata__", None))
        data_start, data_len = 8 + header_len, file_size - 8 - header_len
        ranges = []
        for name, entry in header.items():
            spec, begin = self._parse_entry(name, entry, data_len)
            self.specs[name], self._offsets[name] = spec, data_start + begin
            ranges.append((begin, begin + spec.nbytes, name))
        self._check_no_overlap(ranges)

    def _parse_json(self, header_bytes: bytes) -> object:
        try:
            return json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._fail(f"header is not JSON ({err})") from err
        except (ValueError, RecursionError) as err:  # a number of thousands of digits, nesting too deep
            raise self._fail(f"header holds an unreadable value ({short_repr(str(err))})") from err

    def _parse_metadata(self, metadata: object) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail(f"__metadata__={short_repr(metadata)} is not an object of strings")
        return metadata

    def _parse_entry(self, name: str, entry: object, data_len: int) -> tuple[TensorSpec, int]:
        label = f"tensor {short_repr(name)}"
        if not isinstance(entry, dict):
            raise self._fail(f"{label}: {short_repr(entry)} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._fail(f"{label}: dtype {short_repr(dtype)} is not one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise self._fail(f"{label}: shape {short_repr(shape)} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise self._fail(f"{label}: data_offsets {short_repr(offsets)} is not a pair of non-negative integers")
        spec = TensorSpec(tuple(shape), _DTYPES[dtype])
        begin, end = offsets
        if not begin <= end <= data_len or end - begin != spec.nbytes:
            raise self._fail(
                f"{label}: offsets [{begin}, {end}] do not fit shape {tuple(shape)} of {dtype} inside the "
                f"{data_len} data bytes"
            )
        return spec, begin

    def _check_no_overlap(self, ranges: list[tuple[int, int, str]]) -> None:
        ranges.sort()
        for (_, end, name), (begin, _, other) in itertools.pairwise(ranges):
            if begin < end:
                raise self._fail(f"tensors {short_repr(name)} and {short_repr(other)} share bytes {begin}..{end}")

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding `name`'s data."""
        if name not in self.specs:
            raise ConversionError(f"{self.path} has no tensor {short_repr(name)}")
        spec = self.specs[name]
        tensor = torch.empty(spec.shape, dtype=spec.dtype)
        if spec.nbytes:
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self._offsets[name])
                if f.readinto(buffer) != spec.nbytes:
                    raise self._fail(f"tensor {short_repr(name)} is truncated")
        return tensor


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def plan_shards(specs: list[tuple[str, TensorSpec]], max_shard_size: int) -> list[list[tuple[str, TensorSpec]]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, TensorSpec]]] = [[]]
    filled = 0
    for name, spec in specs:
        if shards[-1] and filled + spec.nbytes > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append((name, spec))
        filled += spec.nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """`model.safetensors` for one shard, else Hugging Face's `model-00001-of-00003.safetensors` names."""
    if num_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


def _header_bytes(entries: list[tuple[str, TensorSpec]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in entries:
        header[name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(encoded)) + encoded


def _write_shard(path: Path, entries: list[tuple[str, TensorSpec]],
                 tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    with open(path, "wb") as f:
        f.write(_header_bytes(entries))
        for name, spec in entries:
            got_name, tensor = next(tensors, (None, None))
            if got_name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                got = "nothing" if got_name is None else f"{got_name} {tuple(tensor.shape)} {tensor.dtype}"
                raise ValueError(f"writing {path.name}: expected tensor {name} {spec.shape} {spec.dtype}, got {got}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def write_safetensors_shards(
    directory: Path, specs: list[tuple[str, TensorSpec]], tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_size: int,
) -> list[str]:
    """Write `tensors` (yielded in the order of `specs`) as Hugging Face shards; return the file names.

    More than one shard also gets `model.safetensors.index.json`, mapping each tensor to its file.
    """
    shards = plan_shards(specs, max_shard_size)
    names = shard_file_names(len(shards))
    for file_name, entries in zip(names, shards, strict=True):
        _write_shard(directory / file_name, entries, tensors)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(spec.nbytes for _, spec in specs)},
            "weight_map": {name: file_name for file_name, entries in zip(names, shards, strict=True)
                           for name, _ in entries},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
