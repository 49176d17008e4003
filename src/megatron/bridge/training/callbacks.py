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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.bridge.training.state import GlobalState

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


class CallbackManager:
    """Holds callbacks per event and calls them in registration order.

    Dispatch is a dict lookup and a loop over a ready list of bound callables.
    """

    def __init__(self) -> None:
        self._callbacks: dict[str, list[CallbackFn]] = {name: [] for name in VALID_EVENTS}
        self._user_state: dict[str, Any] = {}

    def add(self, callback: Callback | Iterable[Callback]) -> None:
        """Register a callback object, or each of a list of them, for the events it overrides."""
        callbacks = [callback] if not isinstance(callback, (list, tuple)) else list(callback)
        for cb in callbacks:
            for event_name in sorted(VALID_EVENTS):
                method = getattr(cb, event_name, None)
                if method is None or not callable(method):
                    continue
                if isinstance(cb, Callback) and getattr(type(cb), event_name) is getattr(Callback, event_name):
                    continue
                self._callbacks[event_name].append(method)

    def register(self, event_name: str, fn: CallbackFn) -> None:
        """Register `fn(context)` for one event; an unknown event name raises `ValueError`."""
        if event_name not in VALID_EVENTS:
            raise _unknown_event(event_name)
        if not callable(fn):
            raise TypeError(f"callback for {event_name!r} must be callable, got {type(fn).__name__}")
        self._callbacks[event_name].append(fn)

    def fire(self, event_name: str, context: CallbackContext) -> None:
        """Call every callback of the event in order; an exception propagates at once."""
        try:
            callbacks = self._callbacks[event_name]
        except KeyError:
            raise _unknown_event(event_name) from None
        for fn in callbacks:
            fn(context)

    def has_callbacks(self, event_name: str) -> bool:
        """True when at least one callback is registered for the event (False for unknown names)."""
        return bool(self._callbacks.get(event_name))

    def list_callbacks(self, event_name: str) -> list[CallbackFn]:
        """A new list of the event's callbacks, in firing order."""
        if event_name not in VALID_EVENTS:
            raise _unknown_event(event_name)
        return list(self._callbacks[event_name])

    @property
    def events(self) -> frozenset[str]:
        """The frozenset of valid event names."""
        return VALID_EVENTS

    @property
    def user_state(self) -> dict[str, Any]:
        """The dict every context built for this manager carries as `user_state`."""
        return self._user_state


def normalize_callbacks(
    callbacks: CallbackManager | Callback | list[Callback] | None,
) -> CallbackManager | None:
    """Turn what `pretrain(callbacks=...)` accepts into a manager (None stays None)."""
    if callbacks is None:
        return None
    if isinstance(callbacks, CallbackManager):
        return callbacks
    manager = CallbackManager()
    manager.add(callbacks)
    return manager


def should_fire(manager: CallbackManager | None, event_name: str) -> bool:
    """Exactly True when `manager` exists and has callbacks for the event, else exactly False."""
    return manager is not None and manager.has_callbacks(event_name)
