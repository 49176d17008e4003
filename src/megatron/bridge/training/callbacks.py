"""User callbacks for the training and evaluation loop.

Callbacks are for users only: the framework never uses them for its own logic. Every fire site in
the loop is guarded by `should_fire`, so with no callbacks registered no `CallbackContext` is built
and nothing here is called.

Where each event fires (each name appears as a literal string at exactly one place):

| event                                                          | file                    | function            |
|----------------------------------------------------------------|-------------------------|---------------------|
| on_data_init_start                                             | training/setup.py       | setup()             |
| on_train_start, on_train_step_start, on_train_step_end,        | training/train.py       | train()             |
| on_train_end                                                   |                         |                     |
| on_eval_start, on_eval_step_start, on_eval_step_end,           | training/eval.py        | evaluate()          |
| on_eval_end, and the same four on_test_* events                |                         |                     |
| on_checkpoint_save                                             | training/checkpointing.py | CheckpointManager |

Which context fields each event provides besides `state`, `model` and `user_state` (the rest are None):

| event                                            | fields                                             |
|--------------------------------------------------|----------------------------------------------------|
| on_data_init_start, on_train_start,              | optimizer, scheduler                               |
| on_train_step_start, on_train_end                |                                                    |
| on_train_step_end                                | optimizer, scheduler, loss_dict, grad_norm,        |
|                                                  | skipped_iter                                       |
| on_eval_start, on_eval_step_start/_end, and the  | none                                               |
| same three on_test_* events                      |                                                    |
| on_eval_end, on_test_end                         | total_loss_dict                                    |
| on_checkpoint_save                               | optimizer                                          |

This module imports nothing beyond the standard library, so importing it is cheap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.bridge.training.state import GlobalState

__all__ = [
    "Callback",
    "CallbackContext",
    "CallbackFn",
    "CallbackManager",
    "VALID_EVENTS",
    "normalize_callbacks",
    "should_fire",
    "untimed",
]

VALID_EVENTS: frozenset[str] = frozenset(
    {
        "on_data_init_start",
        "on_train_start",
        "on_train_step_start",
        "on_train_step_end",
        "on_train_end",
        "on_eval_start",
        "on_eval_step_start",
        "on_eval_step_end",
        "on_eval_end",
        "on_test_start",
        "on_test_step_start",
        "on_test_step_end",
        "on_test_end",
        "on_checkpoint_save",
    }
)

CallbackFn = Callable[["CallbackContext"], Any]

_untimed_seconds = 0.0  # waits left out of callback time, summed over the run (the loop has one thread)


@contextlib.contextmanager
def untimed() -> Iterator[None]:
    """Leave the enclosed code's time out of the running callback's measured time (`stats()`).

    The framework wraps its waits for the GPU in it (reading `grad_norm` or `skipped_iter`,
    `ThroughputMonitor`'s once-per-window synchronisation), so callback time is the callback's own
    work, not GPU time it waited out. Use it the same way around a deliberate wait of your own,
    e.g. `with untimed(): loss = context.loss_dict["lm loss"].item()`.
    """
    global _untimed_seconds
    started = time.perf_counter()
    try:
        yield
    finally:
        _untimed_seconds += time.perf_counter() - started


@dataclass
class CallbackContext:
    """What a callback receives: framework state plus the fields the event provides.

    Fields an event does not provide are None (see the module docstring for the table).
    """

    state: GlobalState
    """The run's `GlobalState`: config, train_state, timers and loggers."""
    model: list[Any]
    """The list of model chunks."""
    user_state: dict[str, Any] = field(default_factory=dict)
    """The manager's dict, shared by every callback for the whole run."""
    optimizer: Any | None = None
    """The optimizer (training events and on_checkpoint_save)."""
    scheduler: Any | None = None
    """The learning-rate scheduler (training events)."""
    loss_dict: dict[str, Any] | None = None
    """on_train_step_end: {"lm loss": 0-dim tensor}, reduced over the global batch."""
    grad_norm: float | None = None
    """on_train_step_end: total gradient norm before clipping, None when not computed."""
    skipped_iter: bool | None = None
    """on_train_step_end: True when the update was not applied."""
    total_loss_dict: dict[str, Any] | None = None
    """on_eval_end / on_test_end: {"lm loss": 0-dim tensor} averaged over all eval steps."""


class Callback:
    """Base class for class-based callbacks: override the events you need.

    `CallbackManager.add` registers only the methods a subclass overrides, so an inherited no-op
    costs nothing.
    """

    def on_data_init_start(self, context: CallbackContext) -> None:
        """Called after the model, optimizer and any checkpoint are loaded, before datasets are built."""

    def on_train_start(self, context: CallbackContext) -> None:
        """Called after `model.train()`, before the first training step."""

    def on_train_step_start(self, context: CallbackContext) -> None:
        """Called before each training step."""

    def on_train_step_end(self, context: CallbackContext) -> None:
        """Called after each optimizer and scheduler step, before the step counter increments."""

    def on_train_end(self, context: CallbackContext) -> None:
        """Called after the training loop and its final checkpoint."""

    def on_eval_start(self, context: CallbackContext) -> None:
        """Called after `model.eval()`, before the validation loop."""

    def on_eval_step_start(self, context: CallbackContext) -> None:
        """Called before each validation step."""

    def on_eval_step_end(self, context: CallbackContext) -> None:
        """Called after each validation step."""

    def on_eval_end(self, context: CallbackContext) -> None:
        """Called after validation losses are averaged, before `model.train()`."""

    def on_test_start(self, context: CallbackContext) -> None:
        """Called after `model.eval()`, before the test loop."""

    def on_test_step_start(self, context: CallbackContext) -> None:
        """Called before each test step."""

    def on_test_step_end(self, context: CallbackContext) -> None:
        """Called after each test step."""

    def on_test_end(self, context: CallbackContext) -> None:
        """Called after test losses are averaged."""

    def on_checkpoint_save(self, context: CallbackContext) -> None:
        """Called after a checkpoint is completely written."""


def _unknown_event(event_name: object) -> ValueError:
    return ValueError(f"Unknown event {event_name!r}. Valid events: {', '.join(sorted(VALID_EVENTS))}")


# Events whose `every=N` filter counts training steps (so it survives a resume); the others count fires.
_STEP_EVENTS = frozenset({"on_train_step_start", "on_train_step_end"})


def callback_name(fn: Any) -> str:
    """A readable name for a registered callable: `Class.method`, `function`, or `<lambda>`."""
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{state_key(owner)}.{getattr(fn, '__name__', '?')}"
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def state_key(callback: Any) -> str:
    """The key a callback's state is saved under: its `name` attribute, else its class's qualified name."""
    name = getattr(callback, "name", None)
    return name if isinstance(name, str) and name else type(callback).__qualname__


class _Entry:
    """One registration: the callable, its filter, and the time spent in it."""

    __slots__ = ("fn", "every", "name", "calls", "seconds", "fires")

    def __init__(self, fn: CallbackFn, every: int | None) -> None:
        self.fn, self.every, self.name = fn, every, callback_name(fn)
        self.calls, self.seconds, self.fires = 0, 0.0, 0


class CallbackManager:
    """Holds callbacks per event and calls them in registration order.

    Dispatch is a dict lookup and a loop over a ready list of registrations. Beyond the
    documented API the manager also filters (`every=N`), times each callback (`stats()`), and
    saves and restores the state of stateful callbacks and `user_state` with each checkpoint.
    """

    def __init__(self) -> None:
        self._entries: dict[str, list[_Entry]] = {name: [] for name in VALID_EVENTS}
        self._user_state: dict[str, Any] = {}
        self._stateful: dict[str, Any] = {}
        self._seconds = 0.0

    def add(self, callback: Callback | Iterable[Callback]) -> None:
        """Register a callback object, or each of a list of them, for the events it overrides.

        A `fire_every` attribute filters its events like `register(..., every=N)`: an int applies
        to every event the object overrides, a dict maps event names to ints. An object with
        `state_dict()` and `load_state_dict()` has its state saved in every checkpoint under
        `state_key(callback)`; two such objects need distinct `name`s.
        """
        callbacks = [callback] if not isinstance(callback, (list, tuple)) else list(callback)
        for cb in callbacks:
            self._add_stateful(cb)
            every = getattr(cb, "fire_every", None)
            if isinstance(every, dict) and not set(every) <= VALID_EVENTS:
                raise _unknown_event(sorted(set(every) - VALID_EVENTS)[0])
            for event_name in sorted(VALID_EVENTS):
                method = getattr(cb, event_name, None)
                if method is None or not callable(method):
                    continue
                if isinstance(cb, Callback) and getattr(type(cb), event_name) is getattr(Callback, event_name):
                    continue
                event_every = every.get(event_name) if isinstance(every, dict) else every
                self._entries[event_name].append(_Entry(method, _check_every(event_every, cb)))

    def _add_stateful(self, cb: Any) -> None:
        if not (callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))):
            return
        key = state_key(cb)
        if key in self._stateful and self._stateful[key] is not cb:
            raise ValueError(
                f"two stateful callbacks share the state key {key!r}; give each a distinct `name` attribute "
                f"(e.g. `callback.name = '{key}-2'`) so that their states are saved apart"
            )
        self._stateful[key] = cb

    def register(self, event_name: str, fn: CallbackFn, *, every: int | None = None) -> None:
        """Register `fn(context)` for one event; an unknown event name raises `ValueError`.

        With `every=N`, `fn` runs only on every N-th training step for on_train_step_start/end
        (steps numbered from 1, so `train_state.step` reads N-1, 2N-1, ...), and on every N-th fire
        for other events; skipped calls cost one comparison.
        """
        if event_name not in VALID_EVENTS:
            raise _unknown_event(event_name)
        if not callable(fn):
            raise TypeError(f"callback for {event_name!r} must be callable, got {type(fn).__name__}")
        self._entries[event_name].append(_Entry(fn, _check_every(every, fn)))

    def fire(self, event_name: str, context: CallbackContext) -> None:
        """Call every callback of the event in order; an exception propagates at once."""
        try:
            entries = self._entries[event_name]
        except KeyError:
            raise _unknown_event(event_name) from None
        clock = time.perf_counter
        for entry in entries:
            if entry.every is not None and not self._due(entry, event_name, context):
                continue
            started, untimed_before = clock(), _untimed_seconds
            try:
                entry.fn(context)
            finally:
                elapsed = clock() - started - (_untimed_seconds - untimed_before)
                entry.calls += 1
                entry.seconds += elapsed
                self._seconds += elapsed

    @staticmethod
    def _due(entry: _Entry, event_name: str, context: CallbackContext) -> bool:
        if event_name in _STEP_EVENTS:
            return (context.state.train_state.step + 1) % entry.every == 0
        entry.fires += 1
        return entry.fires % entry.every == 0

    def has_callbacks(self, event_name: str) -> bool:
        """True when at least one callback is registered for the event (False for unknown names)."""
        return bool(self._entries.get(event_name))

    def list_callbacks(self, event_name: str) -> list[CallbackFn]:
        """A new list of the event's callbacks, in firing order."""
        if event_name not in VALID_EVENTS:
            raise _unknown_event(event_name)
        return [entry.fn for entry in self._entries[event_name]]

    @property
    def events(self) -> frozenset[str]:
        """The frozenset of valid event names."""
        return VALID_EVENTS

    @property
    def user_state(self) -> dict[str, Any]:
        """The dict every context built for this manager carries as `user_state`."""
        return self._user_state

    # ------------------------------------------------------------------------ beyond the guide

    def stats(self) -> dict[str, dict[str, dict[str, float]]]:
        """Time spent per event and callback: `{event: {name: {"calls", "total_s", "mean_ms"}}}`."""
        report: dict[str, dict[str, dict[str, float]]] = {}
        for event_name, entries in sorted(self._entries.items()):
            for entry in entries:
                per_event = report.setdefault(event_name, {})
                row = per_event.setdefault(entry.name, {"calls": 0, "total_s": 0.0, "mean_ms": 0.0})
                row["calls"] += entry.calls
                row["total_s"] += entry.seconds
                row["mean_ms"] = 1000.0 * row["total_s"] / row["calls"] if row["calls"] else 0.0
        return report

    @property
    def total_seconds(self) -> float:
        """Seconds spent inside callbacks so far, over all events."""
        return self._seconds

    def seconds_by_callback(self) -> dict[str, float]:
        """Seconds spent so far per callback name, summed over events."""
        totals: dict[str, float] = {}
        for entries in self._entries.values():
            for entry in entries:
                totals[entry.name] = totals.get(entry.name, 0.0) + entry.seconds
        return totals

    @property
    def has_any(self) -> bool:
        """True when any callback is registered for any event."""
        return any(self._entries.values())

    def state_dict(self) -> dict[str, Any]:
        """The state of every stateful callback, keyed by `state_key`, and the `user_state` dict."""
        return {"callbacks": {key: cb.state_dict() for key, cb in self._stateful.items()},
                "user_state": self._user_state}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore what `state_dict` returned; returns the saved keys no registered callback claims."""
        saved = state.get("callbacks", {})
        for key, cb in self._stateful.items():
            if key in saved:
                cb.load_state_dict(saved[key])
        self._user_state.clear()
        self._user_state.update(state.get("user_state", {}))
        return sorted(set(saved) - set(self._stateful))


def _check_every(every: Any, owner: Any) -> int | None:
    if every is None:
        return None
    if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
        raise ValueError(f"every={every!r} for {callback_name(owner)} is invalid: a positive integer or None")
    return every


_ACCEPTED_CALLBACKS = "a CallbackManager, a Callback, a list of Callbacks, or None"


def normalize_callbacks(
    callbacks: CallbackManager | Callback | list[Callback] | None,
) -> CallbackManager | None:
    """Turn what `pretrain(callbacks=...)` accepts into a manager (None stays None).

    Anything else (a function, a string, a dict, a class instead of an instance, a list holding
    one of those) raises `ValueError` naming the accepted types: it would register nothing.
    """
    if callbacks is None:
        return None
    if isinstance(callbacks, CallbackManager):
        return callbacks
    items = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    for index, item in enumerate(items):
        problem = _not_a_callback(item)
        if problem:
            from megatron.bridge.utils.errors import UserError  # only when refusing: keeps the import light

            where = f"callbacks[{index}]" if isinstance(callbacks, (list, tuple)) else "callbacks"
            raise UserError(f"{where}={item!r} is invalid: {problem}; pass {_ACCEPTED_CALLBACKS}")
    manager = CallbackManager()
    manager.add(callbacks)
    return manager


def _not_a_callback(item: Any) -> str | None:
    """Why `item` cannot be registered with `CallbackManager.add`, or None when it can."""
    if isinstance(item, Callback):
        return None
    if isinstance(item, type):
        return f"a class, not an instance (pass {item.__name__}())"
    if any(callable(getattr(item, name, None)) for name in VALID_EVENTS):
        return None  # not a Callback, but it has event methods: add() registers them
    if callable(item):
        return "a function, not a Callback: register it with CallbackManager.register(event, fn)"
    return f"an object of type {type(item).__name__} with no on_* event method"


def should_fire(manager: CallbackManager | None, event_name: str) -> bool:
    """Exactly True when `manager` exists and has callbacks for the event, else exactly False."""
    return manager is not None and manager.has_callbacks(event_name)
