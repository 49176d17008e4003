"""Shared by the checkpoint fault-injection tests: a trained checkpoint, and the check that a resume is refused.

A refusal must be a `UserError` naming what is wrong, raised before any tensor is read, any callback
state is restored or any step runs, and leave every file of the save folder as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import make_tiny_config
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.utils.errors import UserError


class Stateful(Callback):
    """A callback with state, so that the rank files hold callback state; records what it is given back."""

    name = "stateful"

    def __init__(self) -> None:
        self.restored: list[Any] = []
        self.started = False

    def state_dict(self) -> dict[str, Any]:
        return {"seen": 3, "best": float("inf")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored.append(state)

    def on_train_start(self, context) -> None:
        self.started = True


def train(save: Path, **overrides: Any) -> None:
    """Four tiny steps with checkpoints at 2 and 4 (overrides like `train__train_iters=6`)."""
    settings = dict(train__train_iters=4, checkpoint__save=str(save), checkpoint__save_interval=2)
    settings.update(overrides)
    pretrain(make_tiny_config(**settings), forward_step, [Stateful()])


def snapshot(root: Path) -> list[tuple]:
    """Every entry under `root`: path, kind, size, mtime and content hash (symlinks as their target)."""
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            entries.append((str(path.relative_to(root)), "link", str(path.readlink())))
            continue
        info = path.stat()
        digest = ""
        if path.is_file() and info.st_blocks * 512 >= info.st_size // 2:  # not a huge sparse file
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append((str(path.relative_to(root)), path.is_dir(), info.st_size, info.st_mtime_ns, digest))
    return entries


def expect_refused(root: Path, monkeypatch: pytest.MonkeyPatch, *fragments: str, **overrides: Any) -> str:
    """Resuming from `root` raises a UserError holding `fragments`, having loaded and written nothing."""
    reads: list[Path] = []
    read_tensors = checkpoint_io.load_tensors

    def spy(state_dict, directory, **kwargs):
        reads.append(directory)
        return read_tensors(state_dict, directory, **kwargs)

    monkeypatch.setattr(checkpoint_io, "load_tensors", spy)
    before = snapshot(root)
    callback = Stateful()
    settings = dict(train__train_iters=6, checkpoint__save=str(root), checkpoint__save_interval=1)
    settings.update(overrides)
    with pytest.raises(BaseException) as caught:  # noqa: B017 - the type is asserted below
        pretrain(make_tiny_config(**settings), forward_step, [callback])
    error = caught.value
    assert isinstance(error, UserError), f"expected a UserError, got {type(error).__name__}: {error}"
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert reads == [], "tensors were read from a checkpoint that is refused"
    assert callback.restored == [] and not callback.started
    assert snapshot(root) == before
    return message


@contextlib.contextmanager
def tmpfs(where: Path, *, size: int, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs of `size` bytes mounted at `where` (root only: skips the test otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk and read-only cases cannot be made otherwise")
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
