"""A small schema language for the JSON files of a checkpoint: check every entry, convert, or name it.

A check is a function `(value, key) -> converted value` that raises `SchemaError` naming the key (a
dotted path like `train_state.step` or `rng.python[1][3]`). `validate` runs one over a whole file and
turns the error into a `CheckpointError` naming the file too. Checking and converting are one pass,
so a caller gets either a fully converted value (tensors decoded, tuples rebuilt) or an error, never
half of it: nothing is used before everything was checked.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from megatron.bridge.utils.errors import UserError

__all__ = [
    "Check",
    "SchemaError",
    "array",
    "boolean",
    "encoded",
    "integer",
    "like",
    "mapping",
    "nullable",
    "number",
    "record",
    "sequence",
    "string",
    "tensor",
    "validate",
]

Check = Callable[[Any, str], Any]


class SchemaError(Exception):
    """An entry that does not fit its schema: `key` is its dotted path, `problem` says what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key or '(top level)'}: {problem}")
        self.key, self.problem = key, problem


def validate(check: Check, data: Any, *, file: Path, error: type[UserError]) -> Any:
    """`check(data)`, with a `SchemaError` raised as `error` naming `file` and the key."""
    try:
        return check(data, "")
    except SchemaError as err:
        raise error(f"{file}: {err}") from None


def _child(key: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(minimum: int | None = 0, maximum: int | None = None) -> Check:
    """An int (not a bool, not 3.0) in [minimum, maximum]."""

    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(key, f"{_describe(value)} is not an integer")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f"[{minimum if minimum is not None else '-inf'}, {maximum if maximum is not None else 'inf'}]"
            raise SchemaError(key, f"{value} is out of range {bounds}")
        return value

    return check


def number(minimum: float | None = None) -> Check:
    """A finite int or float (not a bool), at least `minimum`; returned as a float."""

    def check(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(key, f"{_describe(value)} is not a number")
        if not math.isfinite(value):
            raise SchemaError(key, f"{value} is not finite")
        if minimum is not None and value < minimum:
            raise SchemaError(key, f"{value} is below {minimum}")
        return float(value)

    return check


def boolean() -> Check:
    """true or false."""

    def check(value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise SchemaError(key, f"{_describe(value)} is not true or false")
        return value

    return check


def string(*, choices: Iterable[str] | None = None, pattern: str | None = None) -> Check:
    """A string, one of `choices` or matching `pattern` (whole string) when given."""
    allowed = tuple(choices) if choices is not None else None
    compiled = re.compile(pattern) if pattern is not None else None

    def check(value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise SchemaError(key, f"{_describe(value)} is not a string")
        if allowed is not None and value not in allowed:
            raise SchemaError(key, f"{_describe(value)} is not one of {list(allowed)}")
        if compiled is not None and not compiled.fullmatch(value):
            raise SchemaError(key, f"{_describe(value)} is not of the form {pattern}")
        return value

    return check


def nullable(inner: Check) -> Check:
    """null, or what `inner` accepts."""

    def check(value: Any, key: str) -> Any:
        return None if value is None else inner(value, key)

    return check


def array(item: Check, *, length: int | None = None) -> Check:
    """A list of `item`s, of exactly `length` items when given."""

    def check(value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise SchemaError(key, f"{_describe(value)} is not a list")
        if length is not None and len(value) != length:
            raise SchemaError(key, f"has {len(value)} items, expected {length}")
        return [item(entry, _child(key, i)) for i, entry in enumerate(value)]

    return check


def sequence(*items: Check) -> Check:
    """A list of exactly `len(items)` entries, entry i checked by `items[i]`."""

    def check(value: Any, key: str) -> list[Any]:
        if not isinstance(value, list) or len(value) != len(items):
            raise SchemaError(key, f"{_describe(value)} is not a list of {len(items)} items")
        return [item(entry, _child(key, i)) for i, (item, entry) in enumerate(zip(items, value, strict=True))]

    return check


def record(fields: dict[str, Check], *, optional: Iterable[str] = ()) -> Check:
    """An object with exactly these keys (those in `optional` may be missing), each checked."""
    may_miss = set(optional)

    def check(value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SchemaError(key, f"{_describe(value)} is not an object")
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise SchemaError(key, f"unknown keys {unknown} (expected {sorted(fields)})")
        missing = sorted(set(fields) - set(value) - may_miss)
        if missing:
            raise SchemaError(_child(key, missing[0]), "is missing")
        return {name: fields[name](value[name], _child(key, name)) for name in fields if name in value}

    return check


def mapping(name: Check, item: Check) -> Check:
    """An object whose keys are checked by `name` and whose values by `item`."""

    def check(value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SchemaError(key, f"{_describe(value)} is not an object")
        return {name(entry, key): item(value[entry], _child(key, entry)) for entry in value}

    return check


def like(template: dict[str, Any], *, required: Iterable[str]) -> Check:
    """An object holding some of `template`'s keys (all of `required`), each of its value's type.

    Integers must be >= 0 and numbers finite and >= 0: the states this describes (a schedule, a
    loss scaler) hold counts, rates and factors only.
    """
    kinds: dict[type, Check] = {bool: boolean(), int: integer(), float: number(minimum=0.0), str: string()}
    fields = {name: kinds[type(value)] for name, value in template.items()}
    return record(fields, optional=set(fields) - set(required))


# ------------------------------------------------------------------------- values of encode_value


def _dtype_names() -> dict[str, torch.dtype]:
    names = {}
    for name in dir(torch):
        dtype = getattr(torch, name)
        if isinstance(dtype, torch.dtype) and str(dtype) == f"torch.{name}":
            names[name] = dtype
    return names


_DTYPES = _dtype_names()
_TENSOR_KEYS = {"__tensor__", "dtype", "shape"}


def tensor(*, dtype: str | None = None, numel: int | None = None) -> Check:
    """A tensor as `encode_value` writes it, decoded; of `dtype` and `numel` elements when given."""

    def check(value: Any, key: str) -> torch.Tensor:
        if not isinstance(value, dict) or set(value) != _TENSOR_KEYS:
            raise SchemaError(key, f"{_describe(value)} is not an encoded tensor (keys {sorted(_TENSOR_KEYS)})")
        name = string(choices=[dtype] if dtype else _DTYPES)(value["dtype"], _child(key, "dtype"))
        shape = array(integer())(value["shape"], _child(key, "shape"))
        count = math.prod(shape)
        if numel is not None and count != numel:
            raise SchemaError(_child(key, "shape"), f"{shape} holds {count} elements, expected {numel}")
        data = value["__tensor__"]
        if not isinstance(data, str):
            raise SchemaError(_child(key, "__tensor__"), "is not a base64 string")
        try:
            raw = bytearray(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as err:
            raise SchemaError(_child(key, "__tensor__"), f"is not valid base64 ({err})") from None
        item_size = torch.empty(0, dtype=_DTYPES[name]).element_size()
        if len(raw) != count * item_size:
            raise SchemaError(_child(key, "__tensor__"),
                              f"holds {len(raw)} bytes; shape {shape} of {name} needs {count * item_size}")
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(_DTYPES[name]).reshape(shape).clone()

    return check


def encoded() -> Check:
    """Anything `encode_value` writes: JSON scalars, lists, objects, tagged tensors and tuples; decoded."""
    decode_tensor = tensor()

    def check(value: Any, key: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):  # inf and nan included: a "best loss"
            return value
        if isinstance(value, list):
            return [check(entry, _child(key, i)) for i, entry in enumerate(value)]
        if not isinstance(value, dict):
            raise SchemaError(key, f"{_describe(value)} is not a JSON value")
        if "__tensor__" in value:
            return decode_tensor(value, key)
        if "__tuple__" in value:
            items = record({"__tuple__": array(check)})(value, key)["__tuple__"]
            return tuple(items)
        return {name: check(entry, _child(key, name)) for name, entry in value.items()}

    return check
