"""When training must stop early: a signal, `exit_interval` or `exit_duration_in_mins`.

An early stop ends the loop after the current step; the loop then saves and `pretrain` returns
without firing `on_train_end` (training did not complete).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

from megatron.bridge.training.config import TrainingConfig

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitConditions:
    """Checks the early-stop conditions once per step; a context manager that owns the signal handlers."""

    def __init__(self, config: TrainingConfig, *, start_time: float, device: torch.device) -> None:
        self.config = config
        self.start_time = start_time
        self.device = device
        self._signal_received: int | None = None
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> ExitConditions:
        # Python only lets the main thread install handlers; elsewhere signals keep their default.
        if self.config.exit_signal_handler and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal_received = signum

    def check(self, step: int) -> str | None:
        """The reason to stop after `step`, or None to go on; every rank gets the same answer."""
        reason = None
        if self.config.exit_interval and step % self.config.exit_interval == 0:
            reason = f"exit_interval={self.config.exit_interval} reached at iteration {step}"
        if self.config.exit_duration_in_mins is not None:
            minutes = (time.time() - self.start_time) / 60.0
            if self._agreed(minutes > self.config.exit_duration_in_mins):
                reason = f"exit_duration_in_mins={self.config.exit_duration_in_mins} exceeded ({minutes:.1f} min)"
        if self._previous_handlers and self._agreed(self._signal_received is not None):
            received = self._signal_received
            reason = f"received {signal.Signals(received).name}" if received else "another rank received a signal"
        return reason

    def _agreed(self, local: bool) -> bool:
        # Clocks and signals differ between ranks; all must stop at the same step or they deadlock.
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
