"""What happens at the end of each training step beyond the fixed schedule.

Two kinds of stop:
- early stops (a signal with `exit_signal_handler`, `exit_interval`, `exit_duration_in_mins`):
  the loop saves and `pretrain` returns without `on_train_end` (training did not complete);
- requested stops (`state.request_stop(reason)` from a callback): a normal end that saves and
  fires `on_train_end`.

With `exit_signal_handler`, `pretrain` catches signals from the start of training until the
post-training validation and test passes end. The first SIGINT or SIGTERM is acknowledged at once
on rank 0 and stops the run within one step: a training step finishes, then the run saves and
stops; a validation or test pass stops before its next step (it reports no loss and fires no
`on_eval_end` / `on_test_end`), and the passes after it are skipped. A second signal stops the
process at once: SIGINT raises `KeyboardInterrupt` (the command line exits with status 130),
SIGTERM `SystemExit(143)`. A checkpoint being written then is left as a `.tmp_*` folder only
(see `checkpoint.io`), never as an `iter_*` one.

Callbacks may also request a checkpoint or a validation pass. Every rank must take the same
decision at the same step or the ranks deadlock, so the local flags of all ranks are combined
with one small all-reduce per step on a CPU group (no wait for the GPU), done only when something
could differ between ranks.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

from megatron.bridge.training.config import TrainingConfig
from megatron.bridge.training.state import RunRequests
from megatron.bridge.utils.parallel import current_layout

__all__ = ["ExitConditions", "SignalCatcher", "StepDecision", "current_signal_catcher"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_current_catcher: SignalCatcher | None = None


@dataclass
class StepDecision:
    """What every rank does after a step."""

    stop_reason: str | None = None
    """Why training stops now (None: go on)."""
    early: bool = False
    """True for early stops (no `on_train_end`), False for a stop a callback asked for."""
    checkpoint_reason: str | None = None
    """Why a checkpoint is saved now, on request."""
    validation_reason: str | None = None
    """Why a validation pass runs now, on request."""

    @property
    def acts(self) -> bool:
        """True when the step ends with a stop, a requested checkpoint or a requested validation."""
        return bool(self.stop_reason or self.checkpoint_reason or self.validation_reason)


def current_signal_catcher() -> SignalCatcher | None:
    """The outermost enabled `SignalCatcher` now entered (the same on every rank of a run), or None."""
    return _current_catcher


class SignalCatcher:
    """While in `with`, a first SIGTERM or SIGINT is recorded (`received`) instead of ending the process.

    The first signal is acknowledged at once on rank 0 with what happens next (`describe`); a second
    one ends the process at once: SIGINT raises `KeyboardInterrupt`, SIGTERM `SystemExit(143)`.

    Handlers are installed only when `enabled` and on the main thread (Python lets only the main
    thread install them); elsewhere signals keep their handlers. A catcher entered while another is
    entered shares the outer one's record instead of installing its own, so nothing received in
    between is lost. While entered, an enabled catcher is `current_signal_catcher()` on every rank, on
    any thread, so that all ranks take part in `received_on_any_rank` at the same points.
    """

    def __init__(self, enabled: bool, *, timeout: datetime.timedelta | None = None,
                 describe: Callable[[], str] | None = None) -> None:
        self.enabled = enabled
        self.timeout = timeout
        """How long `received_on_any_rank` may wait for the other ranks (None: gloo's default)."""
        self.describe = describe
        """What the run does after the first signal, e.g. "finishing iteration 7, then saving and stopping"."""
        self.current_pass: str | None = None
        """The evaluation pass under way ("validation", "test"), set by the pass, for the acknowledgement."""
        self._received: int | None = None
        self._outer: SignalCatcher | None = None
        self._previous_handlers: dict[int, object] = {}
        self._group: dist.ProcessGroup | None = None

    @property
    def received(self) -> int | None:
        """The signal caught, if any."""
        return self._outer.received if self._outer is not None else self._received

    def __enter__(self) -> SignalCatcher:
        global _current_catcher
        if not self.enabled:
            return self
        if _current_catcher is not None:
            self._outer = _current_catcher
            return self
        _current_catcher = self
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        global _current_catcher
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        if _current_catcher is self:
            _current_catcher = None
        self._outer = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._received is not None:
            _say(f"> received {name} again: stopping now")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._received = signum
        plan = self.describe() if self.describe is not None else "finishing the current step, then stopping"
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
        _say(f"> received {name}: {plan}; {again} to stop now")

    def received_on_any_rank(self) -> str | None:
        """"received SIGTERM" (or SIGINT) when this rank caught a signal, a note when another did, else None.

        A collective when `enabled` in a world of several ranks: every rank must call it at the same point.
        """
        local = self.received
        if self.enabled and current_layout().world_size > 1:
            if self._group is None:
                self._group = dist.new_group(backend="gloo", **({"timeout": self.timeout} if self.timeout else {}))
            flag = torch.tensor([float(local is not None)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            if flag.item() and local is None:
                return "another rank received a signal"
        return None if local is None else f"received {signal.Signals(local).name}"


class ExitConditions:
    """Decides, once per step and identically on every rank, whether to stop, save or validate.

    A context manager that catches signals while training runs (see `SignalCatcher`).
    """

    def __init__(self, config: TrainingConfig, *, start_time: float, requests_possible: bool,
                 timeout: datetime.timedelta | None = None) -> None:
        self.config = config
        self.start_time = start_time
        self.requests_possible = requests_possible
        """False when no callback is registered: nobody can make a request, so there is nothing to combine."""
        self.timeout = timeout
        """How long the per-step combination may wait for the other ranks (None: gloo's default)."""
        self._signals = SignalCatcher(config.exit_signal_handler)
        self._group: dist.ProcessGroup | None = None

    def __enter__(self) -> ExitConditions:
        # Python only lets the main thread install handlers; elsewhere signals keep their default.
        handle_signals = self.config.exit_signal_handler and threading.current_thread() is threading.main_thread()
        self._group = self._combining_group(handle_signals)
        self._signals.__enter__()
        return self

    def _combining_group(self, handle_signals: bool) -> dist.ProcessGroup | None:
        """A CPU (gloo) group for the per-step flags when any rank could raise one, else None.

        The flags are host values: combining them on the CPU never waits for the GPU. Ranks may
        differ in what could raise a flag (callbacks registered on rank 0 only, say), so they agree
        once, here, on whether to combine at all.
        """
        if current_layout().world_size == 1:
            return None
        local = self.requests_possible or self.config.exit_duration_in_mins is not None or handle_signals
        group = dist.new_group(backend="gloo", **({"timeout": self.timeout} if self.timeout else {}))
        needed = torch.tensor([float(bool(local))])
        dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=group)
        return group if needed.item() else None

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(*exc)

    def check(self, step: int, requests: RunRequests) -> StepDecision:
        """Combine this rank's conditions and requests with every other rank's; clear the requests."""
        own = {"stop": requests.stop, "checkpoint": requests.checkpoint, "validation": requests.validation}
        requests.stop = requests.checkpoint = requests.validation = None
        for what, reason in own.items():
            if reason:
                print(f"> [rank {_rank()}] a callback requested {what} after iteration {step}: {reason}", flush=True)
        duration = self.config.exit_duration_in_mins
        minutes = (time.time() - self.start_time) / 60.0
        flags = self._combine([float(duration is not None and minutes > duration),
                               float(self._signals.received is not None),
                               *(float(reason is not None) for reason in own.values())])
        asked = {what: own[what] or ("asked on another rank" if flag else None)
                 for what, flag in zip(own, flags[2:], strict=True)}
        early = self._early_reason(step, flags, minutes)
        requested_stop = f"stop requested by a callback: {asked['stop']}" if asked["stop"] else None
        return StepDecision(stop_reason=early or requested_stop, early=early is not None,
                            checkpoint_reason=asked["checkpoint"], validation_reason=asked["validation"])

    def _early_reason(self, step: int, flags: list[float], minutes: float) -> str | None:
        if self.config.exit_interval and step % self.config.exit_interval == 0:
            return f"exit_interval={self.config.exit_interval} reached at iteration {step}"
        if flags[0]:
            return f"exit_duration_in_mins={self.config.exit_duration_in_mins} exceeded ({minutes:.1f} min)"
        if flags[1]:
            received = self._signals.received
            return f"received {signal.Signals(received).name}" if received else "another rank received a signal"
        return None

    def _combine(self, local: list[float]) -> list[float]:
        # Clocks, signals and callbacks differ between ranks; all must act at the same step.
        if self._group is None:
            return local
        flags = torch.tensor(local)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return flags.tolist()


def _rank() -> int:
    return current_layout().rank


def _say(message: str) -> None:
    # From a signal handler: the main thread may be inside a print to the same stream, which Python
    # refuses to re-enter; the message then goes to stderr unbuffered.
    if current_layout().rank != 0:
        return
    try:
        print(message, flush=True)
    except RuntimeError:
        os.write(sys.stderr.fileno(), f"{message}\n".encode())
