"""Mixed precision: bf16/fp16 compute under autocast with fp32 master weights.

Parameters and optimizer state stay in fp32; matrix multiplies run in the compute dtype. fp16 also
needs dynamic loss scaling, which `torch.amp.GradScaler` provides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and loss scaling for one device and one compute dtype ("bf16", "fp16" or "fp32")."""

    def __init__(self, compute_dtype: str, device: torch.device) -> None:
        self.compute_dtype = compute_dtype
        self.device = device
        self._dtype = _DTYPES.get(compute_dtype)
        self.scaler = torch.amp.GradScaler(device.type) if compute_dtype == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        """A context in which the forward pass runs in the compute dtype."""
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def backward_fn(self) -> Callable[[torch.Tensor], None]:
        """How to back-propagate a loss: scaled first under fp16."""
        if self.scaler is None:
            return torch.Tensor.backward
        scaler = self.scaler
        return lambda loss: scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo the loss scale on the gradients before they are normalised, measured and clipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *, apply: bool) -> None:
        """Apply the update unless `apply` is False; under fp16 also adapt the loss scale."""
        if self.scaler is None:
            if apply:
                optimizer.step()
            return
        if apply:
            self.scaler.step(optimizer)
        self.scaler.update()
