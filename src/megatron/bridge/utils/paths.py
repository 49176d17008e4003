"""One rule for file names read from files: they must lead to a place inside their folder.

An index, a config or a checkpoint's metadata names other files by relative path. Those names come
from whoever wrote the folder, so each is resolved here before anything is opened: no absolute
path, no `..`, and no symlink whose target lies outside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from megatron.bridge.utils.errors import UserError, short_repr

__all__ = ["resolve_inside"]


def resolve_inside(folder: str | os.PathLike, relative: object, *, what: str) -> Path:
    """`folder / relative`, after checking that it stays inside `folder` (symlinks followed).

    `what` says where the name was read, e.g. `"<folder>/model.safetensors.index.json weight_map['x']"`;
    the `UserError` raised for a name that escapes (or is not a file name at all) starts with it.
    """
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise UserError(f"{what}: {short_repr(relative)} is not a file name")
    if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
        raise UserError(f"{what}: {short_repr(relative)} is not inside {folder} (absolute paths and '..' are refused)")
    path = Path(folder) / relative
    root, target = Path(folder).resolve(), path.resolve()
    if not target.is_relative_to(root):
        raise UserError(f"{what}: {short_repr(relative)} is a symlink leading out of {folder}: {path} (to {target})")
    return path
