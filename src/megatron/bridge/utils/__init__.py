"""Neutral helpers shared by `models`, `data` and `training`; nothing here imports those packages."""

from megatron.bridge.utils.lazy import lazy_attributes

# Its modules, each imported on first access: `import` of the package is enough to reach them.
__all__ = [
    "config_checks",
    "config_fields",
    "errors",
    "lazy",
    "logging",
    "parallel",
    "paths",
    "safe_yaml",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), dict.fromkeys(__all__))
del lazy_attributes
