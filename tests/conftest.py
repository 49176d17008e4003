"""Shared fixtures: the tiny config factory, a temporary working directory, process-group hygiene."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# `tests/helpers.py` holds plain functions the test modules import (`from helpers import ...`).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_tiny_config  # noqa: E402

# The test models are tiny: a second intra-op thread only adds synchronisation, and on a busy
# 2-core machine it makes each step many times slower.
torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    """The factory `make_tiny_config(**overrides)` (see `tests/helpers.py`)."""
    return make_tiny_config


@pytest.fixture
def chdir(tmp_path, monkeypatch):
    """Run the test inside `tmp_path` so that nothing (checkpoints, logs) lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """Keep one test's leaked process group from breaking the next; tests assert teardown themselves."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
