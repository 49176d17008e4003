"""Gradient norms and skip decisions, kept on the device until something reads them.

Reading a GPU value on the host (`.item()`) makes the host wait until the GPU has run everything
queued so far, so the next step cannot be queued while this one computes. With a fused optimizer
(Adam's default on GPUs) the loop therefore never reads a step's gradient norm by itself: the
optimizer skips a non-finite update on the device (its `found_inf` input), the learning-rate
schedule advances as if the update was applied, and the outcomes of all steps since the last read
are read together, with one wait, when a reader needs them: the log line, a callback's
`grad_norm`/`skipped_iter`, an evaluation, a checkpoint or the end of training. Reading settles
the bookkeeping of skipped steps: their samples are counted as skipped, the schedule is wound back
by one step for each, and `ddp.check_for_nan_in_grad` raises, naming the first bad iteration.

Between a skipped step and the next read, the learning rate is therefore one step ahead of the
exact schedule (with `logger.log_interval=1` there is no such window). Otherwise (unfused Adam on
CPUs, SGD, fp16 loss scaling) the host reads each outcome right away, which costs nothing on a CPU.
"""

from __future__ import annotations

import math

import torch

from megatron.bridge.training.optim import OptimizerParamScheduler
from megatron.bridge.training.state import TrainState


class StepOutcome:
    """One step's gradient norm and whether its update was skipped; on the device until read."""

    def __init__(self, iteration: int, grad_norm: torch.Tensor | None) -> None:
        self.iteration = iteration
        """The 1-based iteration this step completes."""
        self._norm = grad_norm
        self.found_inf = None if grad_norm is None else (~torch.isfinite(grad_norm)).float()
        """1.0 on the device when the norm is not finite (the update must be skipped), else 0.0."""
        self._host_norm: float | None = None
        self.is_read = grad_norm is None

    @property
    def grad_norm(self) -> float | None:
        """The total norm before clipping as a Python float (None when clipping is off)."""
        if not self.is_read:
            read_outcomes([self])
        return self._host_norm

    @property
    def skipped(self) -> bool:
        """True when the update was not applied: the gradient norm was not finite."""
        norm = self.grad_norm
        return norm is not None and not math.isfinite(norm)


def read_outcomes(outcomes: list[StepOutcome]) -> None:
    """Read every unread outcome's norm with one device-to-host copy."""
    unread = [outcome for outcome in outcomes if not outcome.is_read]
    if not unread:
        return
    values = torch.stack([outcome._norm for outcome in unread]).tolist()
    for outcome, value in zip(unread, values, strict=True):
        outcome._host_norm, outcome.is_read, outcome._norm = value, True, None


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
        self._pending: list[StepOutcome] = []

    def record(self, outcome: StepOutcome) -> None:
        """Count a step whose update has been queued; settle it now unless reads are deferred."""
        self.scheduler.step(1)
        self._pending.append(outcome)
        if not self.deferred:
            self.settle()

    def settle(self) -> None:
        """Read all pending outcomes (one wait for the device) and account for the skipped steps."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        read_outcomes(pending)
        skipped = [outcome for outcome in pending if outcome.skipped]
        if not skipped:
            return
        self.train_state.skipped_train_samples += self.global_batch_size * len(skipped)
        self.scheduler.step(-len(skipped))
        if self.raise_on_nan:
            first = skipped[0]
            raise RuntimeError(
                f"gradient norm is {first.grad_norm} at iteration {first.iteration} "
                "(ddp.check_for_nan_in_grad=True; set it to False to skip such updates instead)"
            )
