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

    def step(self, optimizer: torch.optim.Optimizer, *, skip: bool | torch.Tensor | None) -> None:
        """Apply the update unless `skip`; under fp16 also adapt the loss scale.

        `skip` may be a 0-dim device tensor (1.0: skip) for an optimizer that accepts `found_inf`
        (fused Adam): the update is then skipped on the device and the host never waits for it.
        """
        if isinstance(skip, torch.Tensor):
            assert self.scaler is None, "a device-side skip flag is only used without loss scaling"
            optimizer.found_inf = skip  # read by fused optimizers' step(), as GradScaler does
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            return
        if self.scaler is None:
            if not skip:
                optimizer.step()
            return
        if not skip:
            self.scaler.step(optimizer)
        self.scaler.update()
