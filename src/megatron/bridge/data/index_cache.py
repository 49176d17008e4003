"""A directory of `.npy` index arrays keyed by a hash of what they were built from, checked on every load.

`load_or_build(cache_dir, description, specs, build)` returns the arrays saved under
`<cache_dir>/<hash>_<name>.npy` when every one of them is present and sound, and otherwise calls
`build()` once and saves what it returns. The hash covers every parameter the arrays depend on
(including the version of the scheme that computes them), so a changed parameter gives a new file
rather than a stale one; a `<hash>_description.json` beside the arrays records those parameters for
people.

Sound means: a regular `.npy` file (never unpickled) whose dtype and shape are exactly the ones the
caller expects, with nothing after the data, and whose values all lie in the expected ranges (read
through a memory map in bounded chunks, so a damaged file can neither exhaust memory nor make the
loader index past a dataset). A damaged cache is rebuilt and replaced, with a warning naming the file
and the damage; when it cannot be replaced (a read-only directory) loading stops with a
`DatasetError` naming it. A missing cache that cannot be written is only a warning: the arrays are
built and used in memory.

Every file is written to a temporary name, flushed to disk and moved into place with `os.replace`,
so a reader never sees half a file, even after a crash. `rank_zero_first()` makes rank 0 of a job
build the caches while the other ranks wait, and then lets them load what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from megatron.bridge.data.indexed_dataset import DatasetError
from megatron.bridge.utils.parallel import current_layout

__all__ = [
    "ArraySpec",
    "Arrays",
    "CACHE_FORMAT_VERSION",
    "CachedArrays",
    "cache_key",
    "cache_paths",
    "check_array",
    "load_or_build",
    "rank_zero_first",
]

CACHE_FORMAT_VERSION = 1
_CHECK_CHUNK = 1 << 22  # elements read at a time when checking values
_NPY_MAGIC = b"\x93NUMPY"

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ArraySpec:
    """What a sound cached array looks like.

    `bounds` holds one inclusive `(low, high)` pair per column of the last axis (one pair for a 1-D
    array); with `increasing_rows`, every row is greater than the one before (compared column by
    column, as tuples).
    """

    dtype: str
    shape: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]
    increasing_rows: bool = False


@dataclass(frozen=True)
class CachedArrays:
    """The arrays `load_or_build` returns and where they came from: "loaded", "built" or "rebuilt"."""

    arrays: Arrays
    source: str


def cache_key(description: dict[str, Any]) -> str:
    """A short, stable hash of `description` (a JSON-serialisable dict)."""
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_paths(cache_dir: str, description: dict[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """Where each named array of `description` lives in `cache_dir`."""
    key = cache_key(description)
    return {name: os.path.join(cache_dir, f"{key}_{name}.npy") for name in names}


def load_or_build(
    cache_dir: str,
    description: dict[str, Any],
    specs: dict[str, ArraySpec],
    build: Callable[[], Arrays],
    *,
    check: Callable[[Arrays], str | None] | None = None,
) -> CachedArrays:
    """The arrays named in `specs` for `description`: loaded (memory-mapped) if sound, else built and saved.

    `check` adds a test across arrays that `specs` cannot express; it returns what is wrong, or None.
    """
    paths = cache_paths(cache_dir, description, tuple(specs))
    present = [name for name, path in paths.items() if os.path.lexists(path)]
    damage: tuple[str, str] | None = None
    if present:
        loaded, damage = _load_sound(paths, specs, check)
        if loaded is not None:
            return CachedArrays(loaded, "loaded")
    arrays = build()
    for name, spec in specs.items():
        problem = check_array(arrays[name], spec)
        assert problem is None, f"the freshly built {name} index breaks its own spec: {problem}"
    try:
        _save(cache_dir, description, paths, arrays)
    except OSError as err:
        if damage is not None:
            path, problem = damage
            raise DatasetError(
                f"the dataset index cache {path} is damaged ({problem}) and cannot be replaced ({err}); delete "
                f"it, make {cache_dir} writable, or set dataset.path_to_cache to a writable directory"
            ) from err
        warnings.warn(f"cannot cache dataset indices in {cache_dir} ({err}); they will be rebuilt next time "
                      "(set dataset.path_to_cache to a writable directory)", stacklevel=2)
        return CachedArrays(arrays, "built")
    if damage is None:
        return CachedArrays(arrays, "built")
    path, problem = damage
    warnings.warn(f"rebuilt the damaged dataset index cache {path} ({problem})", stacklevel=2)
    return CachedArrays(arrays, "rebuilt")


def _load_sound(
    paths: dict[str, str], specs: dict[str, ArraySpec], check: Callable[[Arrays], str | None] | None
) -> tuple[Arrays | None, tuple[str, str] | None]:
    """(the arrays, None) if every file is sound, else (None, (a damaged file, what is wrong with it))."""
    arrays: Arrays = {}
    for name, path in paths.items():
        array, problem = _open_checked(path, specs[name])
        if array is None:
            return None, (path, problem)
        arrays[name] = array
    if check is not None and (problem := check(arrays)) is not None:
        return None, (" and ".join(paths.values()), problem)
    return arrays, None


def _open_checked(path: str, spec: ArraySpec) -> tuple[np.ndarray | None, str]:
    """The array memory-mapped from `path` if it matches `spec`, else (None, what is wrong)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, "missing (the cache is incomplete)"
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    try:
        with open(path, "rb") as f:
            if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                return None, f"not a .npy file ({info.st_size} bytes)"
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        return None, f"unreadable: {err}"
    expected_bytes = array.offset + array.nbytes if isinstance(array, np.memmap) else None
    if expected_bytes is not None and info.st_size != expected_bytes:
        return None, f"{info.st_size} bytes where its header describes {expected_bytes}"
    problem = check_array(array, spec)
    return (array, "") if problem is None else (None, problem)


def check_array(array: np.ndarray, spec: ArraySpec) -> str | None:
    """What makes `array` differ from `spec`, or None; values are read in bounded chunks."""
    if array.dtype != np.dtype(spec.dtype):
        return f"dtype {array.dtype}, expected {np.dtype(spec.dtype)}"
    if array.shape != spec.shape:
        return f"shape {array.shape}, expected {spec.shape}"
    if array.size == 0:
        return None
    columns = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    assert columns.shape[1] == len(spec.bounds), "one (low, high) pair per column"
    rows = max(1, _CHECK_CHUNK // columns.shape[1])
    previous = None
    for start in range(0, columns.shape[0], rows):
        chunk = np.asarray(columns[start : start + rows])
        for column, (low, high) in enumerate(spec.bounds):
            values = chunk[:, column]
            smallest, largest = values.min(), values.max()
            if smallest < low or largest > high:
                bad = smallest if smallest < low else largest
                return f"value {bad} in column {column} is outside [{low}, {high}]"
        if spec.increasing_rows:
            with_previous = chunk if previous is None else np.concatenate([previous, chunk])
            if not np.all(_rows_increase(with_previous)):
                return f"rows do not increase somewhere after row {max(start - 1, 0)}"
            previous = chunk[-1:]
    return None


def _rows_increase(rows: np.ndarray) -> np.ndarray:
    """For each row after the first: is it greater than the row before, compared as tuples?"""
    before, after = rows[:-1], rows[1:]
    greater = np.zeros(len(after), dtype=bool)
    equal_so_far = np.ones(len(after), dtype=bool)
    for column in range(rows.shape[1]):
        greater |= equal_so_far & (after[:, column] > before[:, column])
        equal_so_far &= after[:, column] == before[:, column]
    return greater


def _save(cache_dir: str, description: dict[str, Any], paths: dict[str, str], arrays: Arrays) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    for name, path in paths.items():
        _write_atomic(path, lambda f, a=arrays[name]: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
    key = cache_key(description)
    _write_atomic(os.path.join(cache_dir, f"{key}_description.json"),
                  lambda f: f.write(json.dumps(description, indent=2, sort_keys=True).encode()))
    _fsync_directory(cache_dir)


def _write_atomic(path: str, write: Callable[[Any], Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_directory(directory: str) -> None:
    # The renames themselves must reach the disk too; some filesystems cannot fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which then find rank 0's caches).

    Outside a multi-process group it just runs the block. Rank 0 reaches the barrier even when the
    block raises, so the other ranks never hang: they run the block themselves and raise the same error.
    """
    layout = current_layout()
    distributed = layout.world_size > 1
    if distributed and not layout.is_rank_zero:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and layout.is_rank_zero:
            dist.barrier()
