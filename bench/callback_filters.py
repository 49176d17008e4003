"""What an `every=N` filter costs: a skipped callback against a no-op one, per `CallbackManager.fire()`.

A callback registered with `every=1000` on `on_train_step_end` is skipped on 999 steps out of 1000;
a skipped call costs one modulo on `train_state.step` (no clock reads, no call), so it must be
cheaper than calling even a function that does nothing (which `fire` also times with two
`perf_counter()` reads). Measured, in nanoseconds per `fire()` (or per guard check):

  (1) no callbacks: `should_fire(manager, event)`, the guard the loop evaluates before building a
      context (so `fire` is never called), and `fire()` on an event with an empty list;
  (2) one no-op callback (called every time);
  (3) one callback registered with `every=1000`, fired at a step where it is skipped;
  (4) 10 such skipped callbacks;
  (5) 10 no-op callbacks, for comparison with (4).

Row (0) is the timing harness alone (calling an empty lambda); every other row includes it. The
context is built once, as the loop would build it, with `train_state.step = 1` (step 2 is not a
multiple of 1000). Each row is the median over `--repeat` timing runs of `--number` fires each.

    .venv/bin/python bench/callback_filters.py
    .venv/bin/python bench/callback_filters.py --number 200000 --repeat 9
"""

from __future__ import annotations

import argparse
import platform
import statistics
import timeit

from megatron.bridge.training.callbacks import CallbackContext, CallbackManager, should_fire
from megatron.bridge.training.state import GlobalState

EVENT = "on_train_step_end"


def noop(context: CallbackContext) -> None:
    pass


def manager_with(count: int, every: int | None) -> CallbackManager:
    manager = CallbackManager()
    for _ in range(count):
        manager.register(EVENT, noop, every=every)
    return manager


def ns_per_call(statement, number: int, repeat: int) -> float:
    runs = timeit.repeat(statement, number=number, repeat=repeat)
    return 1e9 * statistics.median(runs) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000, help="fires per timing run")
    parser.add_argument("--repeat", type=int, default=7, help="timing runs per row (the median is reported)")
    args = parser.parse_args()

    state = GlobalState()
    state.train_state.step = 1
    context = CallbackContext(state=state, model=[])

    empty = CallbackManager()
    rows: list[tuple[str, float]] = []

    def add_row(label: str, statement) -> None:
        rows.append((label, ns_per_call(statement, args.number, args.repeat)))

    add_row("(0) harness only: an empty lambda", lambda: None)
    add_row("(1) no callbacks: should_fire() guard (loop skips fire)", lambda: should_fire(empty, EVENT))
    add_row("(1) no callbacks: fire() on an empty event", lambda: empty.fire(EVENT, context))
    noop_one = manager_with(1, None)
    add_row("(2) 1 no-op callback", lambda: noop_one.fire(EVENT, context))
    skipped_one = manager_with(1, 1000)
    add_row("(3) 1 skipped callback (every=1000)", lambda: skipped_one.fire(EVENT, context))
    skipped_ten = manager_with(10, 1000)
    add_row("(4) 10 skipped callbacks (every=1000)", lambda: skipped_ten.fire(EVENT, context))
    noop_ten = manager_with(10, None)
    add_row("(5) 10 no-op callbacks", lambda: noop_ten.fire(EVENT, context))

    # The skipped managers really skipped: nothing was called (stats count calls only).
    assert all(row["calls"] == 0 for row in skipped_ten.stats()[EVENT].values())
    assert noop_one.stats()[EVENT]["noop"]["calls"] > 0

    width = max(len(label) for label, _ in rows)
    print(f"CallbackManager.fire() on {EVENT!r}, Python {platform.python_version()}, "
          f"median of {args.repeat} x {args.number:,} calls")
    print(f"{'case':<{width}} | {'ns per call':>11}")
    print(f"{'-' * width}-|-{'-' * 11}")
    for label, ns in rows:
        print(f"{label:<{width}} | {ns:11.1f}")
    by_label = dict(rows)
    one_noop, one_skip = by_label["(2) 1 no-op callback"], by_label["(3) 1 skipped callback (every=1000)"]
    ten_noop, ten_skip = by_label["(5) 10 no-op callbacks"], by_label["(4) 10 skipped callbacks (every=1000)"]
    print(f"\nskipped / no-op: 1 callback {one_skip / one_noop:.2f}x, 10 callbacks {ten_skip / ten_noop:.2f}x "
          f"({'cheaper' if one_skip < one_noop and ten_skip < ten_noop else 'NOT cheaper'})")


if __name__ == "__main__":
    main()
