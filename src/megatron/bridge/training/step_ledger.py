"""Gradient norms and skip decisions, kept on the device until something reads them.

Reading a GPU value on the host (`.item()`) makes the host wait until the GPU has run everything
queued so far, so the next step cannot be queued while this one computes. With a fused optimizer
(Adam's default on GPUs) the loop therefore never reads a step's gradient norm by itself: the
optimizer skips a non-finite update on the device (its `found_inf` input) and the learning-rate
schedule advances as if the update was applied. The pending steps are kept as a few running
totals on the device and read together, with one wait, at points every rank reaches together: the
log line, an evaluation, a checkpoint, a stop or request, and the end of training. Reading
settles the bookkeeping of skipped steps: their samples are counted as skipped and the schedule is
wound back one step for each; `check()` then raises for `ddp.check_for_nan_in_grad`, naming the
first bad iteration (the loop calls it after the log line, so that line shows the window).

Between a skipped step and the next read, the learning rate is ahead of the exact schedule by the
number of skipped steps (with `logger.log_interval=1` there is no such window). Without a fused
optimizer (SGD, fp16 loss scaling, unfused Adam on CPUs) the host reads each step's outcome right
away: free on a CPU, one wait per step on a GPU.

The norm is measured on every step, clipping or not: `optimizer.clip_grad=0` turns off clipping
and the reported norm (callbacks get `grad_norm=None`, as in Megatron), never the skip of a
non-finite update. Under fp16 loss scaling a skipped step may be an overflow of the loss scale
(`StepOutcome.overflow`): it is counted as skipped but is no error for `check_for_nan_in_grad`.
"""

from __future__ import annotations

import math

import torch

from megatron.bridge.checkpoint.train_state import TrainState
from megatron.bridge.training.callbacks import untimed
from megatron.bridge.training.optim import OptimizerParamScheduler

__all__ = ["StepLedger", "StepOutcome", "read_from_device"]


class StepOutcome:
    """One step's gradient norm and whether its update was skipped; on the device until read."""

    def __init__(self, iteration: int, grad_norm: torch.Tensor | None, *, reports_norm: bool = True) -> None:
        self.iteration = iteration
        """The 1-based iteration this step completes."""
        self.norm_on_device = grad_norm
        self.reports_norm = reports_norm
        """False when the norm is measured only to find non-finite gradients (`optimizer.clip_grad=0`)."""
        self.found_inf = None if grad_norm is None else (~torch.isfinite(grad_norm)).float()
        """1.0 on the device when the norm is not finite (the update must be skipped), else 0.0."""
        self.overflow = False
        """True for a skipped step that a loss-scale overflow explains (fp16): counted, never an error."""
        self._host_norm: float | None = None
        self.is_read = grad_norm is None

    @property
    def measured_norm(self) -> float | None:
        """The total norm before clipping as a Python float, reported or not (None when none was measured)."""
        if not self.is_read:
            self.set_read(read_from_device([self.norm_on_device])[0])
        return self._host_norm

    @property
    def grad_norm(self) -> float | None:
        """The total norm before clipping as a Python float (None when clipping is off: none is reported)."""
        norm = self.measured_norm
        return norm if self.reports_norm else None

    @property
    def skipped(self) -> bool:
        """True when the update was not applied: the gradient norm was not finite."""
        norm = self.measured_norm
        return norm is not None and not math.isfinite(norm)

    def set_read(self, value: float) -> None:
        """Record the norm read from the device."""
        self._host_norm, self.is_read = value, True


def read_from_device(tensors: list[torch.Tensor]) -> list[float]:
    """0-dim tensors as Python floats, with one device-to-host copy (one wait for the device).

    The wait is not counted as callback time when a callback's read causes it.
    """
    with untimed():
        return torch.stack([tensor.double() for tensor in tensors]).tolist()


class _PendingSteps:
    """Device-side totals over the steps recorded since the last read: constant memory however many."""

    def __init__(self) -> None:
        self.count = 0
        self.last: StepOutcome | None = None
        self.skipped = self.first_bad_iteration = self.first_bad_norm = None

    def add(self, outcome: StepOutcome) -> None:
        norm, found = outcome.norm_on_device, outcome.found_inf
        assert norm is not None and found is not None
        # float64 counts iterations exactly far beyond any run's length.
        bad_iteration = torch.where(found > 0, torch.tensor(float(outcome.iteration), dtype=torch.float64), math.inf)
        if self.count == 0:
            self.skipped, self.first_bad_iteration, self.first_bad_norm = found, bad_iteration, norm
        else:
            # Until a bad step has been seen the norm slot follows the latest step; then it stays.
            self.first_bad_norm = torch.where(torch.isfinite(self.first_bad_iteration), self.first_bad_norm, norm)
            self.first_bad_iteration = torch.minimum(self.first_bad_iteration, bad_iteration)
            self.skipped = self.skipped + found
        self.last = outcome
        self.count += 1

    def read(self) -> tuple[int, int | None, float | None]:
        """Skipped steps, the first bad iteration and its norm; also reads the last step's norm."""
        assert self.last is not None
        skipped, first_iteration, first_norm, last_norm = read_from_device(
            [self.skipped, self.first_bad_iteration, self.first_bad_norm, self.last.norm_on_device])
        self.last.set_read(last_norm)
        if not skipped:
            return 0, None, None
        return int(skipped), int(first_iteration), first_norm


class StepLedger:
    """Settles the host-side bookkeeping of steps whose outcomes are read later (see module docstring)."""

    def __init__(self, *, train_state: TrainState, scheduler: OptimizerParamScheduler, global_batch_size: int,
                 raise_on_nan: bool, deferred: bool) -> None:
        self.train_state = train_state
        self.scheduler = scheduler
        self.global_batch_size = global_batch_size
        self.raise_on_nan = raise_on_nan
        self.deferred = deferred
        """True when the optimizer skips non-finite updates on the device, so reads can wait."""
        self._pending = _PendingSteps()
        self._error: str | None = None

    def record(self, outcome: StepOutcome) -> None:
        """Count a step whose update has been queued; settle it now unless reads are deferred."""
        self.scheduler.step(1)
        if outcome.found_inf is None:
            return  # no norm measured: nothing can be skipped
        if self.deferred:
            self._pending.add(outcome)
        elif outcome.skipped:  # read right away: free on a CPU
            self._account(1, outcome.iteration, outcome.measured_norm, overflow=outcome.overflow)

    def settle(self, *, check: bool = True) -> None:
        """Read the pending steps' totals (one wait for the device), account for skipped ones, then `check()`."""
        if self._pending.count:
            pending, self._pending = self._pending, _PendingSteps()
            skipped, first_iteration, first_norm = pending.read()
            if skipped:
                self._account(skipped, first_iteration, first_norm)
        if check:
            self.check()

    def check(self) -> None:
        """Raise for a non-finite gradient norm found so far when `ddp.check_for_nan_in_grad` is set.

        Loss-scale overflows (fp16) never raise: the scaler backs off and training goes on.
        """
        if self._error is not None:
            message, self._error = self._error, None
            raise RuntimeError(message)

    def _account(self, skipped: int, first_iteration: int, first_norm: float, *, overflow: bool = False) -> None:
        # A loss-scale overflow is skipped and counted like any non-finite step, but is no NaN to report.
        self.train_state.skipped_train_samples += self.global_batch_size * skipped
        self.scheduler.step(-skipped)
        if self.raise_on_nan and not overflow and self._error is None:
            self._error = (
                f"gradient norm is {first_norm} at iteration {first_iteration} "
                "(ddp.check_for_nan_in_grad=True; set it to False to skip such updates instead)"
            )
