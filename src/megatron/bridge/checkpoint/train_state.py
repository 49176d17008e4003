"""`TrainState`: the counters that say how far training has gone, recorded in every checkpoint.

Re-exported as `megatron.bridge.training.state.TrainState`. It lives with the checkpoint format
because the format records it: the Hugging Face bridge writes a step-0 checkpoint without the
training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Counters that describe how far training has gone; saved in every checkpoint."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_train_samples: int = 0
    """Training samples consumed (step x global batch size)."""
    skipped_train_samples: int = 0
    """Samples of steps whose update was skipped (non-finite gradients)."""
    consumed_valid_samples: int = 0
    """Validation samples consumed so far (the validation stream continues across passes)."""
    floating_point_operations_so_far: float = 0
    """Model FLOPs of all training steps so far."""
    do_train: bool = False
    """Whether this run trains."""
    do_valid: bool = False
    """Whether this run validates."""
    do_test: bool = False
    """Whether this run tests."""

    def state_dict(self) -> dict[str, Any]:
        """The counters as plain Python values."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters saved by `state_dict`; unknown keys raise `KeyError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(state_dict) - names
        if unknown:
            raise KeyError(f"unknown TrainState keys: {sorted(unknown)}")
        for key, value in state_dict.items():
            setattr(self, key, type(getattr(self, key))(value))
