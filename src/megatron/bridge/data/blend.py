"""`dataset.blend` / `dataset.data_path`: which indexed datasets to read, with which weights.

Accepted spellings (Megatron's, plus the flat list its command line uses):

    (["a", "b"], [0.3, 0.7])  or  [["a", "b"], [0.3, 0.7]]   a and b, weighted 3:7
    ["30", "a", "70", "b"]    or  [30, "a", 70, "b"]         a and b, weighted 3:7
    (["a"], None), ["a"] or "a"                              a alone
    ["a", "b"]  or  (["a", "b"], None)                       a and b, weighted by their sizes

A path is a prefix: `a` names `a.bin` and `a.idx`. Weights must be positive; they are normalised
to sum to one. Without weights each dataset weighs as many samples as one epoch of its split
holds (Megatron-LM's rule), so the blend reads like one concatenated corpus.

This module imports nothing from the rest of the package but its error types (and numpy), so the config can
use it freely.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from megatron.bridge.utils.errors import ConfigError

__all__ = ["FORMS", "check_dataset_files", "normalize", "parse_blend"]

FORMS = ('(["path1", "path2"], [w1, w2]), (["path"], None), a flat list like ["30", "pathA", "70", "pathB"] '
         'or ["pathA"], or one path')


def _is_number(item: Any) -> bool:
    if isinstance(item, bool):
        return False
    if isinstance(item, (int, float)):
        return True
    if isinstance(item, str):
        try:
            float(item)
        except ValueError:
            return False
        return True
    return False


def _error(field_name: str, value: Any, reason: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r} is invalid: {reason}")


def _path(item: Any, field_name: str, value: Any) -> str:
    if not isinstance(item, (str, os.PathLike)) or not os.fspath(item):
        raise _error(field_name, value, f"{item!r} is not a path prefix; use {FORMS}")
    return os.path.expanduser(os.fspath(item))


def _weights(items: Any, count: int, field_name: str, value: Any) -> list[float]:
    if not isinstance(items, (list, tuple)) or len(items) != count:
        raise _error(field_name, value, f"{count} weights, one per path (or None)")
    weights = []
    for item in items:
        weight = float(item) if _is_number(item) else math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise _error(field_name, value, f"weight {item!r} is not a positive number; weights must be > 0")
        weights.append(weight)
    return weights


def parse_blend(blend: Any, data_path: Any) -> tuple[list[str], list[float] | None]:
    """The path prefixes and weights (None: unweighted) that `blend` or `data_path` describe."""
    if blend is not None and data_path is not None:
        raise _error("dataset.data_path", data_path, "None when dataset.blend is set (set one of the two)")
    field_name, value = ("dataset.blend", blend) if blend is not None else ("dataset.data_path", data_path)
    if isinstance(value, (str, os.PathLike)):
        return [_path(value, field_name, value)], None
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise _error(field_name, value, f"use {FORMS}")
    if len(value) == 2 and isinstance(value[0], (list, tuple)):
        paths = [_path(item, field_name, value) for item in value[0]]
        if not paths:
            raise _error(field_name, value, "at least one path")
        weights = None if value[1] is None else _weights(value[1], len(paths), field_name, value)
        return paths, weights
    numeric = [_is_number(item) for item in value]
    if not any(numeric):
        return [_path(item, field_name, value) for item in value], None
    if len(value) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        paths = [_path(item, field_name, value) for item in value[1::2]]
        return paths, _weights(value[0::2], len(paths), field_name, value)
    raise _error(field_name, value, f"weights and paths must alternate, weight first; use {FORMS}")


def normalize(weights: list[float]) -> list[float]:
    """`weights` divided by their sum, in float64 as Megatron-LM does (so blends match it bit for bit)."""
    values = np.asarray(weights, dtype=np.float64)
    return (values / values.sum()).tolist()


def check_dataset_files(paths: list[str], field_name: str) -> None:
    """ConfigError naming the first missing `.bin` or `.idx` file of `paths`."""
    for prefix in paths:
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(
                    f"{field_name}: dataset file {prefix + suffix} does not exist (the prefix {prefix!r} needs "
                    f"{prefix}.bin and {prefix}.idx; make them with python -m megatron.bridge.data.preprocess)"
                )
