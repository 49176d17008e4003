"""Deferred step outcomes: with a fused optimizer the loop reads gradient norms only when asked."""

import math

import pytest
import torch

from helpers import make_tiny_config
from megatron.bridge.training import metrics, step_ledger
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.optim import OptimizerParamScheduler
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.state import TrainState
from megatron.bridge.training.step_ledger import StepLedger, StepOutcome


def _scheduler() -> OptimizerParamScheduler:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return OptimizerParamScheduler(optimizer=optimizer, init_lr=0.0, max_lr=1.0, min_lr=0.0, lr_warmup_steps=10,
                                   lr_decay_steps=10, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                   wd_incr_steps=10, wd_incr_style="constant")


def _ledger(*, deferred: bool, raise_on_nan: bool = False) -> tuple[StepLedger, TrainState]:
    train_state = TrainState()
    ledger = StepLedger(train_state=train_state, scheduler=_scheduler(), global_batch_size=8,
                        raise_on_nan=raise_on_nan, deferred=deferred)
    return ledger, train_state


def test_deferred_ledger_reads_nothing_until_settled_then_winds_the_schedule_back():
    ledger, train_state = _ledger(deferred=True)
    outcomes = [StepOutcome(i + 1, torch.tensor(norm)) for i, norm in enumerate([1.0, math.nan, 2.0])]
    for outcome in outcomes:
        ledger.record(outcome)
    assert not any(outcome.is_read for outcome in outcomes)
    assert ledger.scheduler.num_steps == 3 and ledger.scheduler.get_lr() == pytest.approx(0.3)
    assert [o.found_inf.item() for o in outcomes] == [0.0, 1.0, 0.0]

    ledger.settle()
    assert all(outcome.is_read for outcome in outcomes)
    assert [o.skipped for o in outcomes] == [False, True, False]
    assert outcomes[0].grad_norm == 1.0 and math.isnan(outcomes[1].grad_norm)
    assert ledger.scheduler.num_steps == 2 and ledger.scheduler.get_lr() == pytest.approx(0.2)
    assert train_state.skipped_train_samples == 8
    ledger.settle()  # nothing pending: no double counting
    assert ledger.scheduler.num_steps == 2 and train_state.skipped_train_samples == 8


def test_immediate_ledger_settles_each_step_and_raises_naming_the_iteration():
    ledger, _ = _ledger(deferred=False, raise_on_nan=True)
    ledger.record(StepOutcome(1, torch.tensor(3.0)))
    assert ledger.scheduler.num_steps == 1
    with pytest.raises(RuntimeError, match=r"gradient norm is inf at iteration 2 .*check_for_nan_in_grad"):
        ledger.record(StepOutcome(2, torch.tensor(math.inf)))
    assert ledger.scheduler.num_steps == 1


def test_no_norm_means_nothing_to_read_and_nothing_skipped():
    outcome = StepOutcome(1, None)
    assert outcome.is_read and outcome.grad_norm is None and not outcome.skipped and outcome.found_inf is None


# --------------------------------------------------------------------------- the loop with fused Adam


def _adamw(fused: bool) -> type[torch.optim.AdamW]:
    """AdamW forced fused (as setup_optimizer makes it on GPUs; CPUs have the kernel too) or unfused."""

    class ForcedAdamW(torch.optim.AdamW):
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, fused=forced, **kwargs)

    forced = fused
    return ForcedAdamW


def _nan_at(index):
    def step(state, data_iterator, model):
        output, loss_func = forward_step(state, data_iterator, model)
        if model.training and state.train_state.step == index:
            output = output * float("nan")
        return output, loss_func

    return step


def _train(monkeypatch, *, fused: bool, log_interval: int, check_nan: bool = False):
    """Train 5 steps with a NaN loss at iteration 3; return reads, final weights, schedule and skips."""
    monkeypatch.setattr(torch.optim, "AdamW", _adamw(fused))
    reads: list[list[int]] = []
    original = step_ledger.read_outcomes

    def spy(outcomes):
        unread = [o.iteration for o in outcomes if not o.is_read]
        if unread:
            reads.append(unread)
        original(outcomes)

    monkeypatch.setattr(step_ledger, "read_outcomes", spy)
    monkeypatch.setattr(metrics, "read_outcomes", spy)
    cfg = make_tiny_config(train__train_iters=5, logger__log_interval=log_interval,
                           ddp__check_for_nan_in_grad=check_nan)
    end = {}
    manager = CallbackManager()
    manager.register("on_train_end", lambda ctx: end.update(
        weights=torch.cat([p.detach().reshape(-1).clone() for p in ctx.model[0].parameters()]),
        num_steps=ctx.scheduler.num_steps, skipped=ctx.state.train_state.skipped_train_samples,
        fused=bool(ctx.optimizer.defaults.get("fused")),
    ))
    pretrain(cfg, _nan_at(2), callbacks=manager)
    return reads, end


def test_fused_optimizer_defers_reads_to_the_log_line(chdir, monkeypatch):
    reads, end = _train(monkeypatch, fused=True, log_interval=5)
    assert end["fused"]
    assert reads == [[1, 2, 3, 4, 5]]  # one read, at the log line, for all five steps
    assert end["num_steps"] == 4 and end["skipped"] == 4  # the NaN step is skipped and not scheduled


def test_unfused_optimizer_reads_every_step(chdir, monkeypatch):
    reads, end = _train(monkeypatch, fused=False, log_interval=5)
    assert not end["fused"]
    assert reads == [[1], [2], [3], [4], [5]]
    assert end["num_steps"] == 4 and end["skipped"] == 4


def test_deferred_and_immediate_skips_train_the_same_weights_when_logging_every_step(chdir, monkeypatch):
    _, deferred = _train(monkeypatch, fused=True, log_interval=1)
    monkeypatch.undo()
    _, immediate = _train(monkeypatch, fused=False, log_interval=1)
    assert deferred["num_steps"] == immediate["num_steps"] == 4
    # Fused and foreach AdamW round differently (a few 1e-6 after Adam's normalisation); a learning rate one
    # step off would move weights by about 1e-3 (the learning rate), far outside this tolerance.
    torch.testing.assert_close(deferred["weights"], immediate["weights"], rtol=0, atol=2e-5)
    assert torch.isfinite(deferred["weights"]).all()


def test_deferred_check_for_nan_in_grad_raises_at_the_next_read_naming_the_bad_iteration(chdir, monkeypatch):
    with pytest.raises(RuntimeError, match=r"gradient norm is nan at iteration 3 "):
        _train(monkeypatch, fused=True, log_interval=5, check_nan=True)
