"""Mixed precision: bf16/fp16 compute under autocast with fp32 master weights.

Parameters and optimizer state stay in fp32; matrix multiplies run in the compute dtype. fp16 also
needs dynamic loss scaling, which `torch.amp.GradScaler` provides: the loss is multiplied by the
scale before backward, and a step whose gradients overflow is skipped and halves the scale (never
below `min_loss_scale`); `loss_scale_window` steps without overflow double it.

An overflow is normal under fp16, above all in the first steps while the scale finds its level. It
is told apart from a real NaN by `overflowed()`: the loss itself is finite and the scale is above
its floor, so scaling can explain the non-finite gradients and backing off cures them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

__all__ = ["MixedPrecision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and loss scaling for one device and one compute dtype ("bf16", "fp16" or "fp32")."""

    def __init__(self, compute_dtype: str, device: torch.device, *, initial_loss_scale: float = 2.0**16,
                 min_loss_scale: float = 1.0, loss_scale_window: int = 2000) -> None:
        self.compute_dtype = compute_dtype
        self.device = device
        self._dtype = _DTYPES.get(compute_dtype)
        self.min_loss_scale = min_loss_scale
        self.scaler = None
        if compute_dtype == "fp16":
            self.scaler = torch.amp.GradScaler(device.type, init_scale=initial_loss_scale,
                                               growth_interval=loss_scale_window)

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 without loss scaling); reading it waits for the device."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

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

    def overflowed(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether a step with non-finite gradients is a loss-scale overflow rather than a NaN.

        True only under loss scaling, when every one of the step's `losses` is finite and the scale
        is above `min_loss_scale`. Call it before `step()`, which backs the scale off.
        """
        if self.scaler is None or self.loss_scale <= self.min_loss_scale:
            return False
        return all(bool(torch.isfinite(loss).all()) for loss in losses.values())

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
        # Only a skipped step backs off, so only then can the scale have fallen below its floor.
        if skip and self.scaler.get_scale() < self.min_loss_scale:
            self.scaler.update(self.min_loss_scale)
