"""Paths read from files: every one must stay inside the folder it is relative to."""

from __future__ import annotations

import os
from pathlib import Path

from megatron.bridge.utils.errors import UserError


def resolve_inside(folder: str | os.PathLike, relative: str, *, what: str) -> Path:
    """`folder / relative`, resolved, refusing a path that leaves `folder` (`..`, absolute, symlinks).

    `what` names where `relative` was read, e.g. "checkpoint index /ckpt/iter_0000004/.metadata,
    entry model.embedding.weight"; the error repeats it, so the user knows which file to look at.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UserError(f"{what}: the path {relative!r} is not a file name")
    if os.path.isabs(relative):
        raise UserError(f"{what}: the path {relative!r} is absolute; it must be relative to {folder}")
    root = Path(folder).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise UserError(f"{what}: the path {relative!r} ({Path(folder) / relative}) leads outside {root} "
                        f"(to {target})")
    return target
