"""A `checkpoint.save` that cannot work is refused at start, before the first step, naming the reason.

A path that is a file, a path under a file, a read-only filesystem, a folder without room for one
checkpoint: each used to surface only at the first save, after the steps were spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from checkpoint_faults import Stateful, tmpfs

from helpers import make_tiny_config
from megatron.bridge.checkpoint.lock import CheckpointSaveError
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


def refused_at_start(save: Path, **overrides: Any) -> str:
    """Running with `checkpoint.save=save` raises CheckpointSaveError before any step; its message."""
    callback = Stateful()
    with pytest.raises(CheckpointSaveError) as caught:
        pretrain(make_tiny_config(train__train_iters=2, checkpoint__save=str(save), **overrides), forward_step,
                 [callback])
    assert not callback.started, "training started before the save folder was checked"
    message = str(caught.value)
    assert message.startswith(f"checkpoint.save={str(save)!r} cannot be used: "), message
    return message


def test_a_save_path_that_is_a_file_is_refused_at_start(tmp_path):
    path = tmp_path / "ckpt"
    path.write_text("my notes")
    assert "it is a file, not a folder" in refused_at_start(path)
    assert path.read_text() == "my notes"


def test_a_save_path_under_a_file_is_refused_at_start(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot create the folder (Not a directory)" in refused_at_start(tmp_path / "file" / "ckpt")


def test_a_read_only_save_folder_is_refused_at_start(tmp_path):
    with tmpfs(tmp_path / "ro", size=1 << 20, read_only=True) as mount:
        assert "cannot write into the folder (Read-only file system)" in refused_at_start(mount)
        assert "cannot create the folder (Read-only file system)" in refused_at_start(mount / "ckpt")


def test_a_folder_without_room_for_one_checkpoint_is_refused_at_start(tmp_path):
    with tmpfs(tmp_path / "small", size=256 << 10) as mount:
        message = refused_at_start(mount / "ckpt")
        assert "one checkpoint needs about" in message and "bytes) are free there" in message
        assert list((mount / "ckpt").iterdir()) == [], "the refused run left something behind"
        # Without the optimizer state a checkpoint is smaller, but still does not fit.
        assert "needs about" in refused_at_start(mount / "ckpt", checkpoint__save_optim=False)
