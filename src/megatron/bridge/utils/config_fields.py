"""Config objects that refuse misspelled fields.

A dataclass accepts any attribute assignment, so `cfg.train.train_iter = 5` (for `train_iters`) would
silently leave the real field at its default. `KnownFieldsOnly` makes such an assignment raise
`UnknownFieldError`, naming the valid fields and the closest one. Names starting with an underscore
stay free (the model provider keeps its hooks in `_pre_wrap_hooks`), and so do names the class itself
defines (a property with a setter, a method replaced on purpose).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

from megatron.bridge.utils.errors import ConfigError

__all__ = ["KnownFieldsOnly", "UnknownFieldError", "known_fields", "to_plain", "unknown_field_error"]


class UnknownFieldError(ConfigError, AttributeError):
    """Assignment of a field a config class does not have.

    An `AttributeError`, as Python raises for unknown attributes, and a `ConfigError` (a `ValueError`),
    so that the command line and every `except ValueError` treat it as the user's mistake.
    """


@functools.cache
def known_fields(cls: type) -> tuple[str, ...]:
    """The dataclass fields of `cls`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _assignable(cls: type) -> frozenset[str]:
    return frozenset(known_fields(cls)) | frozenset(dir(cls))


def unknown_field_error(section: str, name: str, fields: tuple[str, ...]) -> UnknownFieldError:
    """`unknown field train.train_iter (did you mean train_iters?); valid fields of train: ...`."""
    qualified = f"{section}.{name}" if section else name
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    where = f" of {section}" if section else ""
    return UnknownFieldError(f"unknown field {qualified}{hint}; valid fields{where}: {', '.join(fields)}")


class KnownFieldsOnly:
    """Mixin for config dataclasses: assigning an attribute that is not a field raises `UnknownFieldError`.

    Subclasses set `_section` to the name the section has in a `ConfigContainer` ("train", "model", ...),
    which the message uses.
    """

    _section = ""

    def __setattr__(self, name: str, value: Any) -> None:
        cls = type(self)
        if not name.startswith("_") and name not in _assignable(cls):
            raise unknown_field_error(cls._section, name, known_fields(cls))
        super().__setattr__(name, value)


def to_plain(value: Any) -> Any:
    """A config (or any value inside one) as plain YAML-ready data; dataclasses carry a `_target_` key."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        plain = {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"_target_": f"{type(value).__module__}.{type(value).__qualname__}", **plain}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
