"""Fixtures shared by the PEFT tests (the helpers live in `peft_helpers`)."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import token_batch


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """Two sequences of input ids to compare logits on."""
    return token_batch(batch=2, seed=99)[:, :-1]
