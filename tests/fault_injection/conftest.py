"""Fixtures the checkpoint fault-injection modules share: one trained save folder, and a copy per test to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoint_faults import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The save folder of `checkpoint_faults.train`'s short run, made once per test module."""
    save = tmp_path_factory.mktemp("trained") / "ckpt"
    train(save)
    return save


@pytest.fixture
def root(tmp_path, trained) -> Path:
    """A private copy of `trained`, for one test to edit."""
    copy = tmp_path / "ckpt"
    shutil.copytree(trained, copy)
    return copy
