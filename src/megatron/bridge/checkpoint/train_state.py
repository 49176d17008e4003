"""`TrainState`: the counters that say how far training has gone, recorded in every checkpoint.

Re-exported as `megatron.bridge.training.state.TrainState`. It lives with the checkpoint format
because the format records it: the Hugging Face bridge writes a step-0 checkpoint without the
training loop.

As in Megatron Bridge, `state_dict()` gives 0-dim tensors: counters, a float64 FLOP count and bool
flags. The counters are int64 (Megatron Bridge's are int32, which a long run's sample count
outgrows; `.item()` gives the same Python int). `common.json` holds them as plain JSON numbers and
booleans (`checkpoint.io.write_json` writes a 0-dim tensor as its value), so a checkpoint reads the
same as before they were tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TrainState"]

_DTYPES = {"int": torch.int64, "float": torch.float64, "bool": torch.bool}


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
    floating_point_operations_so_far: float = 0.0
    """Model FLOPs of all training steps so far."""
    do_train: bool = False
    """Whether this run trains (set from the config at start)."""
    do_valid: bool = False
    """Whether this run validates (set from the config at start)."""
    do_test: bool = False
    """Whether this run tests (set from the config at start)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The counters as 0-dim CPU tensors: int64 counts, float64 FLOPs, bool flags."""
        return {field.name: torch.tensor(getattr(self, field.name), dtype=_DTYPES[str(field.type)])
                for field in dataclasses.fields(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters from `state_dict` (0-dim tensors or plain numbers); absent keys keep their value.

        Unknown keys raise `KeyError`; a value of the wrong kind (a fractional count, a flag that is
        not 0 or 1) raises `ValueError` naming the key. Nothing changes unless every entry is good.
        """
        kinds = {field.name: str(field.type) for field in dataclasses.fields(self)}
        unknown = set(state_dict) - set(kinds)
        if unknown:
            raise KeyError(f"unknown TrainState keys: {sorted(unknown)}")
        values = {key: _convert(key, value, kinds[key]) for key, value in state_dict.items()}
        for key, value in values.items():
            setattr(self, key, value)


def _convert(key: str, value: Any, kind: str) -> int | float | bool:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"TrainState.{key}: a tensor of {value.numel()} elements is not one value")
        value = value.item()
    if kind == "bool":
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"TrainState.{key}: {value!r} is not true or false")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"TrainState.{key}: {value!r} is not a finite number")
    if kind == "float":
        return float(value)  # never truncated: FLOP counts are fractional
    if value != int(value):
        raise ValueError(f"TrainState.{key}: {value!r} is not a whole number")
    return int(value)
