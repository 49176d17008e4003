"""Attributes of a package imported on first access (PEP 562), which `dir()` and tab completion list.

    __getattr__, __dir__ = lazy_attributes(__name__, globals(), {"AutoBridge": "models.conversion.auto_bridge",
                                                                "training": None})

maps `AutoBridge` to that module's attribute of the same name, and `training` (None) to the
sub-package itself. Nothing is imported until a name is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, namespace: dict[str, Any],
                    attributes: dict[str, str | None]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package` (whose globals are `namespace`) for `attributes`.

    Each key is imported on first access: from `package.<value>` when the value is a module path
    relative to `package`, or as the sub-module `package.<key>` when it is None. The value is then
    stored in `namespace`, so later reads do not come back here.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook PEP 562 names
        """Import one of the package's lazy names on first access (PEP 562)."""
        if name not in attributes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = attributes[name]
        value = (importlib.import_module(f"{package}.{name}") if module is None
                 else getattr(importlib.import_module(f"{package}.{module}"), name))
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        """The package's names, the lazy ones included, for `dir()` and tab completion (PEP 562)."""
        return sorted(set(namespace) | set(attributes))

    return __getattr__, __dir__
