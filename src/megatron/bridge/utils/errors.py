"""The error types a user can act on, shared by every layer of the package.

`UserError` is what the command line prints as one line (no traceback): a bad setting, a bad file,
a checkpoint that does not fit. It derives from `ValueError`, so code that catches `ValueError` keeps
working. Internal invariants use `assert`, never these.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "INTERRUPTED_STATUS", "UserError", "config_error", "one_line", "short_repr"]

INTERRUPTED_STATUS = 130
"""Exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it."""


class UserError(ValueError):
    """An error in something the user gave (a setting, a file, a checkpoint), with the fix in its message."""


class ConfigError(UserError):
    """A configuration value that is invalid; the message names the field, the value and what is allowed."""


def config_error(field_name: str, value: Any, allowed: str) -> ConfigError:
    """The error every config check raises: `<field>=<value> is invalid: <allowed>`."""
    return ConfigError(f"{field_name}={short_repr(value)} is invalid: {allowed}")


def short_repr(value: Any, limit: int = 200) -> str:
    """`repr(value)`, cut to `limit` characters: a message must not echo a value of unbounded size."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_line(message: object) -> str:
    """`message` on one line: its non-blank lines joined with "; "."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
