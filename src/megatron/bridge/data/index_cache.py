"""A directory of `.npy` index arrays keyed by a hash of what they were built from.

`cached_arrays(cache_dir, description, build)` returns the arrays saved under
`<cache_dir>/<hash>_<name>.npy` when all of them exist, and otherwise calls `build()` once and
saves what it returns. The hash covers every parameter the arrays depend on, so a changed
parameter gives a new file rather than a stale one; a `<hash>_description.json` beside the arrays
records those parameters for people.

Every file is written to a temporary name and moved into place with `os.replace`, so a reader
never sees half a file. Concurrent builders (say, every rank of a job) may both build; the
arrays are deterministic, so whichever rename lands last leaves the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

CACHE_FORMAT_VERSION = 1


def cache_key(description: dict[str, Any]) -> str:
    """A short, stable hash of `description` (a JSON-serialisable dict)."""
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_paths(cache_dir: str, description: dict[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """Where each named array of `description` lives in `cache_dir`."""
    key = cache_key(description)
    return {name: os.path.join(cache_dir, f"{key}_{name}.npy") for name in names}


def cached_arrays(
    cache_dir: str,
    description: dict[str, Any],
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """The arrays `names` for `description`: loaded (memory-mapped) from the cache, else built and saved.

    An unwritable cache directory is not fatal: the arrays are built and used, with a warning.
    """
    paths = cache_paths(cache_dir, description, names)
    if all(os.path.isfile(path) for path in paths.values()):
        return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}
    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        key = cache_key(description)
        _write_atomic(os.path.join(cache_dir, f"{key}_description.json"),
                      lambda f: f.write(json.dumps(description, indent=2, sort_keys=True).encode()))
        for name, path in paths.items():
            _write_atomic(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
    except OSError as err:
        warnings.warn(f"cannot cache dataset indices in {cache_dir} ({err}); they will be rebuilt next time "
                      "(set dataset.path_to_cache to a writable directory)", stacklevel=2)
    return arrays


def _write_atomic(path: str, write: Callable[[Any], Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
