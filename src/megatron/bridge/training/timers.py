"""Named timers with Megatron's API: `timers("forward-backward", log_level=1).start()`.

`Timers(log_level, log_option)` hands out one `Timer` per name. A timer asked for with a `log_level`
above the run's `logger.timing_log_level` is a shared no-op (`DummyTimer`), so timing that nobody
asked for costs nothing. `Timers.log(names)` prints the times across ranks as
`logger.timing_log_option` says ("max", "minmax" or "all", in milliseconds) and `Timers.write(names,
writer, iteration)` writes each one's maximum across ranks to TensorBoard as `<name>-time` (in
seconds). Both gather from every rank: every rank must call them with the same names.

Time on a GPU. The training loop never waits for the device in a step (see `step_ledger`), and its
own timers must not either. So while CUDA is in use a timer does not synchronise the device as
Megatron's does at every start and stop: it records a CUDA event on the current stream at `start`
and at `stop`, and the interval is the device's time between the two events. For GPU work that is
its run time; across an idle device it is the host's time in between. `elapsed()` waits for the
last `stop` event, which the log line (the only reader in the loop) has waited for already.
Without CUDA an interval is the host's `time.perf_counter()` time. `barrier=True` makes every rank
wait for the others first (`torch.distributed.barrier`), as in Megatron: only ask for it where every
rank gets there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from megatron.bridge.utils.parallel import current_layout

__all__ = ["LOG_OPTIONS", "MAX_LOG_LEVEL", "DummyTimer", "Timer", "Timers"]

MAX_LOG_LEVEL = 2
"""The finest timing level: 0 the iteration time, 1 once-per-step phases, 2 per-micro-batch work."""
LOG_OPTIONS = ("max", "minmax", "all")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class Timer:
    """Wall time accumulated over start/stop pairs, on the device's clock while CUDA is in use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._elapsed = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        """Device intervals whose events may not have been reached yet; read (and waited for) on `elapsed`."""
        self._started = False
        self._start_time = 0.0
        self._start_event: torch.cuda.Event | None = None

    @property
    def active(self) -> bool:
        """True while the timer runs."""
        return self._started

    def start(self, barrier: bool = False) -> None:
        """Start an interval (after all ranks arrive, with `barrier`); starting a running timer is an error."""
        assert not self._started, f"timer {self.name!r} has already been started"
        if barrier:
            _barrier()
        if _cuda_in_use():
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._start_event = None
            self._start_time = time.perf_counter()
        self._started = True

    def stop(self, barrier: bool = False) -> None:
        """End the interval and add it to the total; stopping a timer that is not running is an error."""
        assert self._started, f"timer {self.name!r} is not started"
        if barrier:
            _barrier()
        if self._start_event is not None:
            stop_event = torch.cuda.Event(enable_timing=True)
            stop_event.record()
            self._pending.append((self._start_event, stop_event))
            self._start_event = None
            self._read_pending(wait=False)  # folds what the device has passed: the list stays short
        else:
            self._elapsed += time.perf_counter() - self._start_time
        self._started = False

    def reset(self) -> None:
        """Zero the total and drop a running interval (the timer is stopped)."""
        self._elapsed = 0.0
        self._pending.clear()
        self._start_event = None
        self._started = False

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Seconds accumulated since the last reset, including a running interval (which goes on running).

        `reset` zeroes the total afterwards. Waits for the device to pass the last `stop` on a GPU.
        """
        running = self._started
        if running:
            self.stop(barrier=barrier)
        self._read_pending(wait=True)
        total = self._elapsed
        if reset:
            self.reset()
        if running:
            self.start(barrier=barrier)
        return total

    def _read_pending(self, *, wait: bool) -> None:
        while self._pending:
            start_event, stop_event = self._pending[0]
            if wait:
                stop_event.synchronize()
            elif not stop_event.query():
                return
            self._elapsed += start_event.elapsed_time(stop_event) / 1000.0
            self._pending.pop(0)


class DummyTimer:
    """What `Timers` hands out for a level above `logger.timing_log_level`: starts and stops do nothing."""

    name = "dummy timer"
    active = False

    def __init__(self, log_level: int) -> None:
        self._log_level = log_level

    def start(self, barrier: bool = False) -> None:
        """Does nothing."""

    def stop(self, barrier: bool = False) -> None:
        """Does nothing."""

    def reset(self) -> None:
        """Does nothing."""

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Refused, as in Megatron: a timer below the timing level measures nothing."""
        raise RuntimeError(f"this timer measures nothing: its log_level is above the timing level "
                           f"{self._log_level} (raise logger.timing_log_level to time it)")


class Timers:
    """The run's named timers, filtered by `log_level`; `log` and `write` report them across ranks."""

    def __init__(self, log_level: int = MAX_LOG_LEVEL, log_option: str = "minmax") -> None:
        if isinstance(log_level, bool) or log_level not in range(MAX_LOG_LEVEL + 1):
            raise ValueError(f"timing log level {log_level!r} is not one of 0, 1, 2")
        if log_option not in LOG_OPTIONS:
            raise ValueError(f"timing log option {log_option!r} is not one of {list(LOG_OPTIONS)}")
        self._log_level = log_level
        self._log_option = log_option
        self._timers: dict[str, Timer] = {}
        self._log_levels: dict[str, int] = {}
        self._dummy_timer = DummyTimer(log_level)

    def __call__(self, name: str, log_level: int | None = None) -> Timer | DummyTimer:
        """The timer called `name`, created on first use at `log_level` (None: 2, the finest).

        A level above this run's timing level gives a `DummyTimer`; asking for an existing timer with
        another level is an error.
        """
        if name in self._timers:
            if log_level is not None and log_level != self._log_levels[name]:
                raise ValueError(f"timer {name!r} exists with log_level {self._log_levels[name]}, "
                                 f"not {log_level}")
            return self._timers[name]
        level = MAX_LOG_LEVEL if log_level is None else log_level
        if isinstance(level, bool) or level not in range(MAX_LOG_LEVEL + 1):
            raise ValueError(f"timer {name!r}: log_level {level!r} is not one of 0, 1, 2")
        if level > self._log_level:
            return self._dummy_timer
        self._timers[name] = Timer(name)
        self._log_levels[name] = level
        return self._timers[name]

    def names(self) -> list[str]:
        """Names of the real timers created so far, in creation order."""
        return list(self._timers)

    def log(self, names: Iterable[str], rank: int | None = None, normalizer: float = 1.0, reset: bool = True,
            barrier: bool = False) -> None:
        """Print the timers' times across ranks (ms, divided by `normalizer`) on `rank` (None: the last rank).

        Every rank must call it with the same names; timers that measured nothing are left out.
        """
        text = self.get_all_timers_string(names, normalizer=normalizer, reset=reset, barrier=barrier)
        layout = current_layout()
        if text is not None and layout.rank == (layout.world_size - 1 if rank is None else rank):
            print(text, flush=True)

    def write(self, names: Iterable[str], writer: Any, iteration: int, normalizer: float = 1.0, reset: bool = False,
              barrier: bool = False) -> None:
        """Write each timer's maximum across ranks (seconds, divided by `normalizer`) as `<name>-time`.

        `writer` is a TensorBoard `SummaryWriter` (`add_scalar`), a W&B run (`log`), or None (the
        times are still gathered: every rank must call it with the same names).
        """
        times = self._min_max(list(names), normalizer=normalizer, reset=reset, barrier=barrier)
        if writer is None:
            return
        for name, (_, longest) in times.items():
            if hasattr(writer, "add_scalar"):
                writer.add_scalar(f"{name}-time", longest, iteration)
            else:
                writer.log({f"{name}-time": longest}, step=iteration)

    def get_all_timers_string(self, names: Iterable[str] | None = None, normalizer: float = 1.0, reset: bool = True,
                              barrier: bool = False) -> str | None:
        """The text `log` prints (None when no timer measured anything); every rank must call it."""
        names = list(self._timers) if names is None else list(names)
        if self._log_option == "all":
            return self._all_ranks_string(names, normalizer=normalizer, reset=reset, barrier=barrier)
        times = self._min_max(names, normalizer=normalizer / 1000.0, reset=reset, barrier=barrier)
        if not times:
            return None
        if self._log_option == "max":
            rows = [f"    {(name + ' ').ljust(48, '.')}: {longest:.2f}" for name, (_, longest) in times.items()]
            return "\n".join(["max time across ranks (ms):", *rows])
        rows = [f"    {(name + ' ').ljust(48, '.')}: ({shortest:.2f}, {longest:.2f})"
                for name, (shortest, longest) in times.items()]
        return "\n".join(["(min, max) time across ranks (ms):", *rows])

    def _elapsed_all_ranks(self, names: list[str], *, reset: bool, barrier: bool) -> list[list[float]]:
        """Seconds per rank (outer list) and name (inner list); 0.0 where a rank has no such timer."""
        if barrier:
            _barrier()
        local = [self._timers[name].elapsed(reset=reset) if name in self._timers else 0.0 for name in names]
        world = current_layout().world_size
        if not names or not _distributed() or world == 1:
            return [local]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        mine = torch.tensor(local, dtype=torch.float64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        return [row.tolist() for row in everyone]

    def _min_max(self, names: list[str], *, normalizer: float, reset: bool,
                 barrier: bool) -> dict[str, tuple[float, float]]:
        if normalizer <= 0:
            raise ValueError(f"normalizer={normalizer} must be positive")
        per_rank = self._elapsed_all_ranks(names, reset=reset, barrier=barrier)
        times = {}
        for i, name in enumerate(names):
            measured = [row[i] for row in per_rank if row[i] > 0.0]
            if measured:
                times[name] = (min(measured) / normalizer, max(measured) / normalizer)
        return times

    def _all_ranks_string(self, names: list[str], *, normalizer: float, reset: bool, barrier: bool) -> str | None:
        if normalizer <= 0:
            raise ValueError(f"normalizer={normalizer} must be positive")
        per_rank = self._elapsed_all_ranks(names, reset=reset, barrier=barrier)
        lines = ["times across ranks (ms):"]
        for i, name in enumerate(names):
            rows = [f"     rank {rank:2d}: {1000.0 * row[i] / normalizer:.2f}"
                    for rank, row in enumerate(per_rank) if row[i] > 0.0]
            if rows:
                lines += [f"  {name}:", *rows]
        return "\n".join(lines) if len(lines) > 1 else None
