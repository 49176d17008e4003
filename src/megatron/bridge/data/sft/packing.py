"""Offline packing: first-fit bin packing of examples into rows, and the on-disk cache of the packs.

First fit puts each example, in turn, into the first pack with room for it, opening a new pack when
none has room. `first_fit_shuffle` takes the examples in a seeded random order; `first_fit_decreasing`
longest first (fuller packs; long and short examples then tend to share packs). The first pack with
room is found in a max segment tree over the packs' free space: O(log n) per example.

Cache: one safetensors file per split, `<folder>/<split file stem>.<key[:16]>.safetensors`, holding the
`SFTRows` arrays, with the full key, its inputs and the split's statistics in the header. safetensors
holds only arrays and strings, so loading runs no code (no pickle). It is written to a temporary file,
flushed to disk and renamed over the target, so a reader sees a whole file or none. A file whose key
differs (another tokenizer, seed, size, data...) is never read: the key is in the name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron.bridge.data.sft.collate import SFTRows

__all__ = [
    "CACHE_FORMAT_VERSION",
    "cache_key",
    "cache_path",
    "file_identity",
    "first_fit",
    "load_packs",
    "pack_examples",
    "save_packs",
]

CACHE_FORMAT_VERSION = 1
"""Bumped whenever tokenization, masks or the cache layout change, so that old caches are not reused."""
_ROW_ARRAYS = ("ids", "loss_mask", "example_offsets", "row_offsets")


def first_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Packs (lists of example indices, in insertion order) from first fit over `order`."""
    size = 1
    while size < max(len(order), 1):
        size *= 2
    # free[size + b] is pack b's free space (unopened packs are empty ones); free[i] the max of its children.
    free = np.full(2 * size, capacity, dtype=np.int64)
    packs: list[list[int]] = []
    for example in order:
        length = int(lengths[example])
        assert 0 < length <= capacity, "examples are truncated to the pack size"
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        pack = node - size
        if pack == len(packs):
            packs.append([])
        packs[pack].append(int(example))
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return packs


def pack_examples(lengths: Sequence[int], capacity: int, *, algorithm: str, seed: int) -> list[list[int]]:
    """Packs of `capacity` model positions over examples of the given position counts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if algorithm == "first_fit_decreasing":
        order = np.argsort(-lengths, kind="stable")
    else:
        assert algorithm == "first_fit_shuffle", algorithm
        order = np.random.default_rng(seed).permutation(len(lengths))
    return first_fit(lengths, capacity, order)


def file_identity(path: Path) -> dict[str, Any]:
    """Name, size, modification time and sha256 of a data file: its part of a cache key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def cache_key(inputs: dict[str, Any]) -> str:
    """sha256 of the key inputs (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_path(folder: Path, split_file: Path, key: str) -> Path:
    """Where the packs of `split_file` under `key` live."""
    return folder / f"{split_file.stem}.{key[:16]}.safetensors"


def save_packs(path: Path, rows: SFTRows, *, key: str, inputs: dict[str, Any], stats: dict[str, Any]) -> None:
    """Write `rows` to `path` atomically (temporary file, fsync, rename), with the key and stats in the header."""
    from safetensors.numpy import save

    metadata = {"key": key, "inputs": json.dumps(inputs, sort_keys=True), "stats": json.dumps(stats)}
    payload = save({name: getattr(rows, name) for name in _ROW_ARRAYS}, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def load_packs(path: Path, key: str) -> tuple[SFTRows, dict[str, Any]] | None:
    """The rows and stats cached at `path` under `key`; None when there is no such file or it does not hold them."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError):
        return None
    if metadata.get("key") != key or set(arrays) != set(_ROW_ARRAYS):
        return None
    rows = SFTRows(**{name: arrays[name] for name in _ROW_ARRAYS}, packed=True)
    return rows, json.loads(metadata["stats"])


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk (POSIX; a no-op where folders cannot be opened).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
