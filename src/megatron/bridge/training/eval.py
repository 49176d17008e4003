"""Validation and test passes, and the on_eval_* / on_test_* events.

With `train.exit_signal_handler`, a pass looks for a signal before each of its steps (all ranks
agree, one small CPU all-reduce per step in a world of several ranks) and stops there: a pass cut
short reports no loss and fires no `on_eval_end` / `on_test_end`, since it has no result. In
training, the loop then saves and stops without `on_train_end` (an early stop); after training,
`pretrain` skips the passes that remain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron.bridge.training.callbacks import CallbackContext, should_fire
from megatron.bridge.training.exit_conditions import SignalCatcher, current_signal_catcher
from megatron.bridge.training.forward_backward import LossReport, run_microbatches
from megatron.bridge.training.metrics import log_eval_losses
from megatron.bridge.utils.logging import print_rank_0

if TYPE_CHECKING:
    from megatron.bridge.training.setup import SetupOutput

__all__ = ["evaluate"]


def evaluate(run: SetupOutput, mode: str, *, final: bool = False) -> dict[str, torch.Tensor] | None:
    """Run `eval_iters` global batches of the validation (`mode="eval"`) or test split.

    Returns {"lm loss": 0-dim tensor}, the token-weighted mean over every step and rank, or None
    when there is nothing to evaluate or a signal stopped the pass (see the module's docstring).
    `final`: the pass after training (labelled as such).
    """
    assert mode in ("eval", "test"), mode
    data_iterator = run.data.valid if mode == "eval" else run.data.test
    eval_iters = run.state.cfg.validation.eval_iters
    if data_iterator is None or eval_iters == 0:
        return None
    signals = current_signal_catcher()
    name = "validation" if mode == "eval" else "test"
    if signals is not None:
        signals.current_pass = name
    try:
        total_loss_dict = _run_pass(run, mode, data_iterator, eval_iters, signals)
    finally:
        if signals is not None:
            signals.current_pass = None
    if total_loss_dict is not None:
        log_eval_losses(run.state, name, total_loss_dict, final=final)
    return total_loss_dict


def _context(run: SetupOutput, **fields: Any) -> CallbackContext:
    callbacks = run.callbacks
    assert callbacks is not None
    return CallbackContext(state=run.state, model=run.model, user_state=callbacks.user_state, **fields)


@dataclass(frozen=True)
class _PassEvents:
    start: str
    step_start: str
    step_end: str
    end: str


# The event names stay literal strings so that a search for any of them lands here.
_EVENTS = {
    "eval": _PassEvents("on_eval_start", "on_eval_step_start", "on_eval_step_end", "on_eval_end"),
    "test": _PassEvents("on_test_start", "on_test_step_start", "on_test_step_end", "on_test_end"),
}


def _run_pass(run: SetupOutput, mode: str, data_iterator: Iterator[Any], eval_iters: int,
              signals: SignalCatcher | None) -> dict[str, torch.Tensor] | None:
    callbacks, events = run.callbacks, _EVENTS[mode]
    _set_mode(run, training=False)
    if should_fire(callbacks, events.start):
        callbacks.fire(events.start, _context(run))
    total = None
    for done in range(eval_iters):
        received = signals.received_on_any_rank() if signals is not None else None
        if received:
            print_rank_0(f"> {received}: {signals.current_pass} pass stopped after {done} of "
                         f"validation.eval_iters={eval_iters} steps; it reports no loss")
            _set_mode(run, training=True)
            return None
        if should_fire(callbacks, events.step_start):
            callbacks.fire(events.step_start, _context(run))
        total = _accumulate(total, _eval_step(run, data_iterator))
        if mode == "eval":
            run.state.train_state.consumed_valid_samples += run.state.cfg.train.global_batch_size
        if should_fire(callbacks, events.step_end):
            callbacks.fire(events.step_end, _context(run))
    total_loss_dict = _reduce(total)
    if should_fire(callbacks, events.end):
        callbacks.fire(events.end, _context(run, total_loss_dict=total_loss_dict))
    _set_mode(run, training=True)
    return total_loss_dict


def _eval_step(run: SetupOutput, data_iterator: Iterator[Any]) -> LossReport:
    with torch.no_grad():
        return run_microbatches(
            run.forward_step, run.state, data_iterator, run.model[0],
            num_microbatches=run.num_microbatches, autocast=run.precision.autocast, backward=None,
        )


def _accumulate(total: LossReport | None, step: LossReport) -> LossReport:
    if total is None:
        return step
    sums = {name: total.sums[name] + pair for name, pair in step.sums.items()}
    return LossReport(sums, total.num_tokens + step.num_tokens)


def _reduce(total: LossReport | None) -> dict[str, torch.Tensor]:
    assert total is not None
    total.all_reduce()
    return total.means()


def _set_mode(run: SetupOutput, *, training: bool) -> None:
    for chunk in run.model:
        chunk.train(training)
