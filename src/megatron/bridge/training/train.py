"""The training loop and one training step; fires the four on_train_* events."""

from __future__ import annotations

import datetime
import gc
from collections.abc import Callable
from typing import Any

import torch

from megatron.bridge.training.callbacks import CallbackContext, should_fire
from megatron.bridge.training.eval import evaluate
from megatron.bridge.training.exit_conditions import ExitConditions, StepDecision
from megatron.bridge.training.forward_backward import run_microbatches
from megatron.bridge.training.metrics import StepResult
from megatron.bridge.training.optim import get_canonical_lr_for_logging, get_grad_norm
from megatron.bridge.training.parallelize import reduce_gradients
from megatron.bridge.training.setup import SetupOutput
from megatron.bridge.training.step_ledger import StepOutcome
from megatron.bridge.training.timers import Timers
from megatron.bridge.utils.logging import print_rank_0

__all__ = ["train", "train_step"]


def train(run: SetupOutput) -> bool:
    """Train until `train_iters`; return False when an early-stop condition ended training."""
    state, callbacks, cfg = run.state, run.callbacks, run.state.cfg
    train_state = state.train_state
    for chunk in run.model:
        chunk.train()
    if train_state.step >= cfg.train.train_iters:
        print_rank_0(f"> already trained {train_state.step} of train.train_iters={cfg.train.train_iters} "
                     "iterations: nothing to train")
    if should_fire(callbacks, "on_train_start"):
        callbacks.fire("on_train_start", _context(run))
    decision = StepDecision()
    run.metrics.begin()
    exit_conditions = ExitConditions(cfg.train, start_time=state.start_time,
                                     requests_possible=callbacks is not None and callbacks.has_any,
                                     timeout=datetime.timedelta(minutes=cfg.dist.distributed_timeout_minutes))
    with exit_conditions, _manual_gc(cfg.train.manual_gc, cfg.train.manual_gc_interval) as collect_garbage:
        while train_state.step < cfg.train.train_iters:
            if should_fire(callbacks, "on_train_step_start"):
                callbacks.fire("on_train_step_start", _context(run))
            result = train_step(run)
            if should_fire(callbacks, "on_train_step_end"):
                callbacks.fire("on_train_step_end", _context(
                    run, context_type=_StepEndContext, outcome=result.outcome, loss_dict=result.loss_dict,
                ))
            train_state.step += 1
            train_state.consumed_train_samples += cfg.train.global_batch_size
            train_state.floating_point_operations_so_far += run.metrics.flops_per_token * result.num_tokens
            validated = _should_validate(cfg, train_state.step)
            reads = validated or run.metrics.is_due(train_state.step) or run.checkpointer.is_due(train_state.step)
            if reads:
                run.ledger.settle(check=False)
            run.metrics.maybe_log(result, learning_rate=_logged_learning_rate(run), flush=reads)
            run.ledger.check()  # after the log line, which then shows the window of a bad step
            if validated:
                with run.metrics.paused():
                    evaluate(run, "eval")
            # Requests are agreed before saving, so a requested validation is in this step's checkpoint.
            decision = exit_conditions.check(train_state.step, state.requests)
            if decision.acts:
                run.ledger.settle()
                run.metrics.flush()
            with run.metrics.paused():
                if decision.validation_reason and not validated:
                    evaluate(run, "eval")
                run.checkpointer.maybe_save(train_state.step)
                if decision.checkpoint_reason:
                    run.checkpointer.save(train_state.step)
            collect_garbage(train_state.step)
            if decision.stop_reason:
                break
    run.ledger.settle()
    run.metrics.end()
    run.checkpointer.save_final(train_state.step)
    if decision.stop_reason:
        print_rank_0(f"> stopping after iteration {train_state.step}: {decision.stop_reason}")
    if decision.early:
        return False
    if should_fire(callbacks, "on_train_end"):
        callbacks.fire("on_train_end", _context(run))
    return True


def train_step(run: SetupOutput) -> StepResult:
    """One optimizer step over `num_microbatches` micro-batches, gradients normalised per token.

    Its phases run under Megatron's level-1 timers (`metrics.LOOP_TIMERS`), no-ops unless
    `logger.timing_log_level >= 1`.
    """
    cfg, optimizer, timers = run.state.cfg, run.optimizer, run.state.timers
    optimizer.zero_grad(set_to_none=True)
    with _timed(timers, "forward-backward"):
        report = run_microbatches(
            run.forward_step, run.state, run.data.train, run.model[0], num_microbatches=run.num_microbatches,
            autocast=run.precision.autocast, backward=run.precision.backward_fn(),
        )
    with _timed(timers, "all-grads-sync"):
        reduce_gradients(run.model[0], run.layout)
        report.all_reduce()
    timers("optimizer", log_level=1).start()
    with _timed(timers, "optimizer-unscale-and-check-inf"):
        run.precision.unscale_(optimizer)
        # DDP and FSDP average gradients over ranks; the loss must be averaged over tokens instead.
        _divide_grads(run.model, report.num_tokens / run.layout.data_parallel_size)
    # The norm is measured even without clipping: a non-finite update is skipped whatever clip_grad is.
    clip_grad = cfg.optimizer.clip_grad
    with _timed(timers, "optimizer-clip-main-grad"):
        norm = get_grad_norm(run.model, clip_grad=clip_grad)
    outcome = StepOutcome(iteration=run.state.train_state.step + 1, grad_norm=norm, reports_norm=clip_grad > 0)
    loss_dict = report.means()
    with _timed(timers, "optimizer-inner-step"):
        if run.ledger.deferred:
            # A fused optimizer skips a non-finite update on the device: the host does not wait for the norm.
            run.precision.step(optimizer, skip=outcome.found_inf)
        else:
            # Decided before step(), which backs the loss scale off.
            outcome.overflow = outcome.skipped and run.precision.overflowed(loss_dict)
            run.precision.step(optimizer, skip=outcome.skipped)
    timers("optimizer", log_level=1).stop()
    run.ledger.record(outcome)
    # Every replica's batches have this rank's shape (finetuning pads each global batch to one length).
    tokens = report.input_tokens * run.layout.data_parallel_size or cfg.train.global_batch_size * cfg.model.seq_length
    return StepResult(loss_dict=loss_dict, outcome=outcome, num_tokens=tokens)


class _timed:  # noqa: N801 - used like a function in a `with` statement
    """A level-1 timer around a phase of the step (a class: cheaper per step than a generator)."""

    __slots__ = ("timer",)

    def __init__(self, timers: Timers, name: str) -> None:
        self.timer = timers(name, log_level=1)

    def __enter__(self) -> None:
        self.timer.start()

    def __exit__(self, *exc: object) -> None:
        self.timer.stop()


def _divide_grads(model: list[torch.nn.Module], divisor: torch.Tensor) -> None:
    # Micro-batches back-propagate loss sums; dividing once by the global token count gives the
    # gradient of the token-weighted mean over the whole global batch.
    grads = [p.grad for chunk in model for p in chunk.parameters() if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, divisor.clamp(min=1e-8).to(grads[0].device))


def _should_validate(cfg: Any, step: int) -> bool:
    interval = cfg.validation.eval_interval
    return bool(interval) and cfg.validation.eval_iters > 0 and step % interval == 0


def _read_on_access(name: str, read: Callable[[StepOutcome], Any]) -> property:
    """A context field taken from the step's outcome when first read, unless assigned."""

    def get(self: _StepEndContext) -> Any:
        if name in self.__dict__ or self._outcome is None:
            return self.__dict__.get(name)
        return read(self._outcome)

    def set(self: _StepEndContext, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set)


class _StepEndContext(CallbackContext):
    """on_train_step_end's context: `grad_norm` and `skipped_iter` wait for the device only when read.

    A callback that reads neither (a timer, a throughput meter) lets the GPU run ahead like no
    callback at all. Assigning either field stores the assigned value.
    """

    grad_norm = _read_on_access("grad_norm", lambda outcome: outcome.grad_norm)
    skipped_iter = _read_on_access("skipped_iter", lambda outcome: outcome.skipped)

    def __init__(self, outcome: StepOutcome | None = None, **fields: Any) -> None:
        super().__init__(**fields)
        # The dataclass __init__ stored the None defaults through the setters; reads go to `outcome` instead.
        for name in ("grad_norm", "skipped_iter"):
            if self.__dict__.get(name) is None:
                self.__dict__.pop(name, None)
        self._outcome = outcome


def _context(run: SetupOutput, *, context_type: type[CallbackContext] = CallbackContext,
             **fields: Any) -> CallbackContext:
    callbacks = run.callbacks
    assert callbacks is not None
    return context_type(state=run.state, model=run.model, user_state=callbacks.user_state,
                        optimizer=run.optimizer, scheduler=run.scheduler, **fields)


class _manual_gc:  # noqa: N801 - used like a function in a `with` statement
    """Disable automatic garbage collection and collect every `interval` steps (when enabled)."""

    def __init__(self, enabled: bool, interval: int) -> None:
        self.enabled, self.interval = enabled, interval

    def __enter__(self):
        if self.enabled:
            gc.disable()
            gc.collect()
        return self

    def __call__(self, step: int) -> None:
        if self.enabled and self.interval and step % self.interval == 0:
            gc.collect()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            gc.enable()


def _logged_learning_rate(run: SetupOutput) -> float:
    """The rate of the first group on the default schedule, as Megatron logs; the schedule's own when none is."""
    canonical = get_canonical_lr_for_logging(run.optimizer.param_groups)
    return canonical if canonical is not None else run.scheduler.get_lr()
