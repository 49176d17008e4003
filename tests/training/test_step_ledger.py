"""Deferred step outcomes: with a fused optimizer the loop reads gradient norms only when asked."""

import math

import pytest
import torch

from helpers import make_tiny_config, nan_at_step
from megatron.bridge.training import step_ledger
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
    norms = [1.0, math.nan, 2.0, math.inf]
    outcomes = [StepOutcome(i + 1, torch.tensor(norm)) for i, norm in enumerate(norms)]
    for outcome in outcomes:
        ledger.record(outcome)
    assert not any(outcome.is_read for outcome in outcomes)
    assert ledger.scheduler.num_steps == 4 and ledger.scheduler.get_lr() == pytest.approx(0.4)
    assert [o.found_inf.item() for o in outcomes] == [0.0, 1.0, 0.0, 1.0]

    ledger.settle()
    assert outcomes[-1].is_read and outcomes[-1].grad_norm == math.inf  # the log line's value
    assert ledger.scheduler.num_steps == 2 and ledger.scheduler.get_lr() == pytest.approx(0.2)
    assert train_state.skipped_train_samples == 16
    ledger.settle()  # nothing pending: no double counting
    assert ledger.scheduler.num_steps == 2 and train_state.skipped_train_samples == 16
    # Earlier steps are still readable one by one, for whoever asks.
    assert [o.skipped for o in outcomes] == [False, True, False, True]


def test_deferred_check_for_nan_names_the_first_bad_iteration_and_its_norm():
    ledger, _ = _ledger(deferred=True, raise_on_nan=True)
    for iteration, norm in enumerate([1.0, 2.0, math.nan, 3.0, math.inf], start=1):
        ledger.record(StepOutcome(iteration, torch.tensor(norm)))
    with pytest.raises(RuntimeError, match=r"gradient norm is nan at iteration 3 "):
        ledger.settle()


def test_immediate_ledger_accounts_each_step_and_check_raises_naming_the_iteration():
    ledger, train_state = _ledger(deferred=False, raise_on_nan=True)
    ledger.record(StepOutcome(1, torch.tensor(3.0)))
    ledger.record(StepOutcome(2, torch.tensor(math.inf)))
    assert ledger.scheduler.num_steps == 1 and train_state.skipped_train_samples == 8
    with pytest.raises(RuntimeError, match=r"gradient norm is inf at iteration 2 .*check_for_nan_in_grad"):
        ledger.check()
    ledger.check()  # raised once


def test_settle_without_check_keeps_the_error_for_check():
    ledger, _ = _ledger(deferred=True, raise_on_nan=True)
    ledger.record(StepOutcome(1, torch.tensor(math.nan)))
    ledger.settle(check=False)  # the loop prints the log line in between
    with pytest.raises(RuntimeError, match=r"iteration 1 "):
        ledger.check()


def test_no_norm_means_nothing_to_read_and_nothing_skipped():
    outcome = StepOutcome(1, None)
    assert outcome.is_read and outcome.grad_norm is None and not outcome.skipped and outcome.found_inf is None


@pytest.mark.parametrize(("norm", "skipped"), [(2.5, False), (math.nan, True), (math.inf, True)])
def test_an_unreported_norm_still_decides_the_skip(norm, skipped):
    outcome = StepOutcome(1, torch.tensor(norm), reports_norm=False)  # optimizer.clip_grad=0
    assert outcome.found_inf.item() == float(skipped)
    assert outcome.grad_norm is None and outcome.skipped is skipped
    assert outcome.measured_norm == norm or (math.isnan(norm) and math.isnan(outcome.measured_norm))


def test_a_loss_scale_overflow_is_skipped_and_counted_but_never_raises():
    ledger, train_state = _ledger(deferred=False, raise_on_nan=True)
    overflow = StepOutcome(1, torch.tensor(math.inf))
    overflow.overflow = True
    ledger.record(overflow)
    assert ledger.scheduler.num_steps == 0 and train_state.skipped_train_samples == 8
    ledger.check()  # no error: the scaler backs off and training goes on
    ledger.record(StepOutcome(2, torch.tensor(math.nan)))  # a NaN the scale cannot explain
    with pytest.raises(RuntimeError, match=r"gradient norm is nan at iteration 2 "):
        ledger.check()
    assert train_state.skipped_train_samples == 16


# --------------------------------------------------------------------------- the loop with fused Adam


def _adamw(fused: bool) -> type[torch.optim.AdamW]:
    """AdamW forced fused (as setup_optimizer makes it on GPUs; CPUs have the kernel too) or unfused."""
    forced = fused

    class ForcedAdamW(torch.optim.AdamW):
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, fused=forced, **kwargs)

    return ForcedAdamW


def _record_end_state(end: dict):
    """An on_train_end callback that stores the final weights, schedule, skips, lr and fusion in `end`."""
    return lambda ctx: end.update(
        weights=torch.cat([p.detach().reshape(-1).clone() for p in ctx.model[0].parameters()]),
        num_steps=ctx.scheduler.num_steps, skipped=ctx.state.train_state.skipped_train_samples,
        lr=ctx.scheduler.get_lr(), fused=bool(ctx.optimizer.defaults.get("fused")),
    )


def _train(monkeypatch, *, fused: bool, log_interval: int, check_nan: bool = False, clip_grad: float = 1.0):
    """Train 5 steps with a NaN loss at iteration 3; return device reads, final weights, schedule and skips."""
    monkeypatch.setattr(torch.optim, "AdamW", _adamw(fused))
    reads: list[int] = []  # tensors per device-to-host read
    original = step_ledger.read_from_device

    def spy(tensors):
        reads.append(len(tensors))
        return original(tensors)

    monkeypatch.setattr(step_ledger, "read_from_device", spy)
    cfg = make_tiny_config(train__train_iters=5, logger__log_interval=log_interval,
                           ddp__check_for_nan_in_grad=check_nan, optimizer__clip_grad=clip_grad)
    end = {"reads_at_step_start": []}
    manager = CallbackManager()
    # A callback that asks for no value must not cause reads.
    manager.register("on_train_step_start", lambda ctx: end["reads_at_step_start"].append(len(reads)))
    manager.register("on_train_end", _record_end_state(end))
    pretrain(cfg, nan_at_step(2), callbacks=manager)
    return reads, end


def test_fused_optimizer_defers_reads_to_the_log_line(chdir, monkeypatch):
    reads, end = _train(monkeypatch, fused=True, log_interval=5)
    assert end["fused"]
    assert end["reads_at_step_start"] == [0, 1, 1, 1, 1]  # the first iteration's log line, then none
    # One read per log line (the first iteration's and the fifth's): skip count, first bad iteration and norm,
    # last norm; none in between.
    assert reads == [4, 4]
    assert end["num_steps"] == 4 and end["skipped"] == 4  # the NaN step is skipped and not scheduled


def test_unfused_optimizer_reads_every_step(chdir, monkeypatch):
    reads, end = _train(monkeypatch, fused=False, log_interval=5)
    assert not end["fused"]
    assert end["reads_at_step_start"] == [0, 1, 2, 3, 4]
    assert reads == [1, 1, 1, 1, 1]
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


def test_log_line_counts_a_deferred_skip_and_averages_only_applied_steps(chdir, monkeypatch, capsys):
    _train(monkeypatch, fused=True, log_interval=5)
    line = next(line for line in capsys.readouterr().out.splitlines() if "iteration        5/" in line)
    assert "number of skipped iterations:   1" in line and "number of nan iterations:   1" in line
    loss = float(line.split("lm loss: ")[1].split(" |")[0])
    assert math.isfinite(loss) and 3.0 < loss < 6.0  # ln(128) = 4.85 at the start of training
    assert "grad norm: " in line and "grad norm: nan" not in line  # the last step's norm


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_without_clipping_a_nan_update_is_still_skipped_and_counted(chdir, monkeypatch, capsys, fused):
    reads, end = _train(monkeypatch, fused=fused, log_interval=5, clip_grad=0.0)
    assert end["num_steps"] == 4 and end["skipped"] == 4
    assert torch.isfinite(end["weights"]).all()
    if fused:
        assert reads == [4, 4]  # still no read per step: only the log lines' (iterations 1 and 5)
    line = next(line for line in capsys.readouterr().out.splitlines() if "iteration        5/" in line)
    assert "number of skipped iterations:   1" in line and "number of nan iterations:   1" in line
    assert "grad norm" not in line  # without clipping no norm is reported, as in Megatron


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_without_clipping_check_for_nan_in_grad_still_raises(chdir, monkeypatch, fused):
    with pytest.raises(RuntimeError, match=r"gradient norm is nan at iteration 3 "):
        _train(monkeypatch, fused=fused, log_interval=5, check_nan=True, clip_grad=0.0)


# ------------------------------------------------------------------- reads and checkpoints together


def _run_with_checkpoints(monkeypatch, save_dir, *, save_interval=None, request_checkpoint_at=None):
    """6 steps, fused AdamW, NaN at iteration 3, no log line before the end; return the final state."""
    monkeypatch.setattr(torch.optim, "AdamW", _adamw(True))
    cfg = make_tiny_config(train__train_iters=6, logger__log_interval=100, ddp__check_for_nan_in_grad=False,
                           checkpoint__save=str(save_dir), checkpoint__load=str(save_dir),
                           checkpoint__save_interval=save_interval)
    end = {}
    manager = CallbackManager()

    def maybe_request(ctx):
        if ctx.state.train_state.step == request_checkpoint_at:
            ctx.state.request_checkpoint("test")

    manager.register("on_train_step_start", maybe_request)
    manager.register("on_train_end", _record_end_state(end))
    pretrain(cfg, nan_at_step(2), callbacks=manager)
    return end


def _keep_only_step_4(save_dir):
    import shutil

    for directory in save_dir.glob("iter_*"):
        if directory.name != "iter_0000004":
            shutil.rmtree(directory)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("4")


@pytest.mark.parametrize("how", ["save_interval", "callback_request"])
def test_checkpoint_after_a_deferred_skip_resumes_exactly(tmp_path, monkeypatch, how):
    # The step-4 checkpoint is written while iteration 3's skip is still unread on the device:
    # it must hold the settled schedule (3 steps, not 4) and skip count, or the resumed run diverges.
    kwargs = {"save_interval": 4} if how == "save_interval" else {"request_checkpoint_at": 3}
    monkeypatch.chdir(tmp_path)
    full = _run_with_checkpoints(monkeypatch, tmp_path / "ckpt", **kwargs)
    assert full["num_steps"] == 5 and full["skipped"] == 4
    _keep_only_step_4(tmp_path / "ckpt")
    resumed = _run_with_checkpoints(monkeypatch, tmp_path / "ckpt", **kwargs)
    assert (resumed["num_steps"], resumed["skipped"], resumed["lr"]) == (full["num_steps"], full["skipped"], full["lr"])
    torch.testing.assert_close(resumed["weights"], full["weights"], rtol=0, atol=0)


def test_deferred_nan_check_prints_the_log_line_before_raising(chdir, monkeypatch, capsys):
    with pytest.raises(RuntimeError, match=r"iteration 3 "):
        _train(monkeypatch, fused=True, log_interval=5, check_nan=True)
    assert "number of skipped iterations:   1" in capsys.readouterr().out


# --------------------------------------------------------------------- on_train_step_end's fields


def test_step_end_callback_reads_only_what_it_asks_for(chdir, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _adamw(True))
    reads: list[int] = []
    original = step_ledger.read_from_device
    monkeypatch.setattr(step_ledger, "read_from_device",
                        lambda tensors: reads.append(len(tensors)) or original(tensors))
    cfg = make_tiny_config(train__train_iters=4, logger__log_interval=100)
    norms: list = []
    manager = CallbackManager()
    manager.register("on_train_step_end", lambda ctx: None)  # asks for nothing
    manager.register("on_train_step_end", lambda ctx: norms.append(ctx.grad_norm) if ctx.state.train_state.step >= 2
                     else None)
    pretrain(cfg, forward_step, callbacks=manager)
    # The first iteration's log line reads its totals; step 1 reads nothing; steps 2 and 3 read their own
    # norm; the last iteration's log line reads the totals.
    assert reads == [4, 1, 1, 4]
    assert len(norms) == 2 and all(type(norm) is float and math.isfinite(norm) for norm in norms)
