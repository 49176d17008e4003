"""The error types a user can act on, shared by every layer of the package.

`UserError` is what the command line prints as one line (no traceback): a bad setting, a bad file,
a checkpoint that does not fit. It derives from `ValueError`, so code that catches `ValueError` keeps
working. Internal invariants use `assert`, never these.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """An error in something the user gave (a setting, a file, a checkpoint), with the fix in its message."""


class ConfigError(UserError):
    """A configuration value that is invalid; the message names the field, the value and what is allowed."""


def config_error(field_name: str, value: Any, allowed: str) -> ConfigError:
    """The error every config check raises: `<field>=<value> is invalid: <allowed>`."""
    return ConfigError(f"{field_name}={value!r} is invalid: {allowed}")
