"""TrainState, Timers and GlobalState."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from helpers import make_tiny_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.state import GlobalState, Timers, TrainState

# ------------------------------------------------------------------------------------------ TrainState


def test_train_state_defaults():
    ts = TrainState()
    assert ts.step == 0
    assert ts.consumed_train_samples == 0
    assert ts.skipped_train_samples == 0
    assert ts.consumed_valid_samples == 0
    assert ts.floating_point_operations_so_far == 0
    assert (ts.do_train, ts.do_valid, ts.do_test) == (False, False, False)


def test_train_state_fields():
    names = {f.name for f in dataclasses.fields(TrainState)}
    assert {"step", "consumed_train_samples", "skipped_train_samples", "consumed_valid_samples",
            "floating_point_operations_so_far", "do_train", "do_valid", "do_test"} <= names


def test_train_state_state_dict_round_trip():
    ts = TrainState(step=7, consumed_train_samples=28, skipped_train_samples=4, consumed_valid_samples=8,
                    floating_point_operations_so_far=1.5e12, do_train=True, do_valid=True, do_test=False)
    sd = ts.state_dict()
    assert type(sd) is dict
    assert sd["step"].item() == 7 and sd["consumed_train_samples"].item() == 28
    assert sd["skipped_train_samples"].item() == 4

    restored = TrainState()
    restored.load_state_dict(sd)
    assert restored == ts
    assert {k: v.item() for k, v in restored.state_dict().items()} == {k: v.item() for k, v in sd.items()}

    # The tensors are new: changing them later does not change the state.
    sd["step"] += 100
    assert ts.step == 7


def test_train_state_state_dict_holds_megatron_bridges_0_dim_tensors():
    sd = TrainState(step=3, floating_point_operations_so_far=2.5, do_valid=True).state_dict()
    dtypes = {name: value.dtype for name, value in sd.items()}
    assert dtypes == {"step": torch.int64, "consumed_train_samples": torch.int64, "skipped_train_samples": torch.int64,
                      "consumed_valid_samples": torch.int64, "floating_point_operations_so_far": torch.float64,
                      "do_train": torch.bool, "do_valid": torch.bool, "do_test": torch.bool}
    assert all(value.dim() == 0 and value.device.type == "cpu" for value in sd.values())


@pytest.mark.parametrize("flops", [3000.5, torch.tensor(3000.5, dtype=torch.float64)], ids=["number", "tensor"])
def test_train_state_load_keeps_fractional_flops(flops):
    ts = TrainState()
    ts.load_state_dict({"floating_point_operations_so_far": flops, "step": torch.tensor(5), "do_test": True})
    assert ts.floating_point_operations_so_far == 3000.5
    assert type(ts.floating_point_operations_so_far) is float and type(ts.step) is int and ts.step == 5
    assert ts.do_test is True


@pytest.mark.parametrize(("entry", "words"), [
    ({"step": 2.5}, "whole number"), ({"step": True}, "finite number"), ({"do_train": 2}, "true or false"),
    ({"floating_point_operations_so_far": float("nan")}, "finite number"),
    ({"step": torch.tensor([1, 2])}, "2 elements"),
])
def test_train_state_load_refuses_values_of_the_wrong_kind_and_changes_nothing(entry, words):
    ts = TrainState(consumed_train_samples=12)
    with pytest.raises(ValueError, match=words) as err:
        ts.load_state_dict({"consumed_train_samples": 99, **entry})
    assert next(iter(entry)) in str(err.value)
    assert ts.consumed_train_samples == 12


def test_train_state_load_rejects_unknown_keys():
    ts = TrainState()
    with pytest.raises(KeyError, match="bogus"):
        ts.load_state_dict({"step": 3, "bogus": 1})


def test_train_state_partial_load_keeps_other_fields():
    ts = TrainState(consumed_train_samples=12)
    ts.load_state_dict({"step": 3})
    assert ts.step == 3
    assert ts.consumed_train_samples == 12


class AddQuarterFlop(Callback):
    """Adds 0.25 FLOP per step: a fraction the counter must keep through a checkpoint."""

    def on_train_step_end(self, context):
        context.state.train_state.floating_point_operations_so_far += 0.25


class FlopsAtStart(Callback):
    def on_train_start(self, context):
        self.flops = context.state.train_state.floating_point_operations_so_far


def test_fractional_flops_survive_a_checkpoint_whose_common_json_stays_plain_json(chdir):
    import json

    save = str(chdir / "ckpt")
    pretrain(make_tiny_config(train__train_iters=2, validation__eval_iters=0, checkpoint__save=save), forward_step,
             callbacks=[AddQuarterFlop()])
    saved = json.loads((chdir / "ckpt" / "iter_0000002" / "common.json").read_text())["train_state"]
    # The tensors of state_dict() are written as the plain numbers and booleans checkpoints always held.
    assert type(saved["step"]) is int and saved["step"] == 2 and saved["consumed_train_samples"] == 8
    assert saved["do_train"] is True and saved["do_test"] is False
    flops = saved["floating_point_operations_so_far"]
    assert type(flops) is float and flops % 1 == 0.5
    seen = FlopsAtStart()
    pretrain(make_tiny_config(train__train_iters=3, validation__eval_iters=0, checkpoint__save=save,
                              checkpoint__load=save), forward_step, callbacks=[seen])
    assert seen.flops == flops


# ---------------------------------------------------------------------------------------------- Timers


def test_timers_return_the_same_named_timer():
    timers = Timers()
    assert timers("forward") is timers("forward")
    assert timers("forward") is not timers("backward")
    assert timers.names() == ["forward", "backward"]


def test_timer_accumulates_across_start_stop_pairs():
    timer = Timers()("step")
    assert timer.elapsed(reset=False) == 0.0
    timer.start()
    time.sleep(0.02)
    timer.stop()
    first = timer.elapsed(reset=False)
    assert 0.02 <= first < 5
    time.sleep(0.02)  # not running: not counted
    assert timer.elapsed(reset=False) == first
    timer.start()
    time.sleep(0.02)
    timer.stop()
    total = timer.elapsed(reset=False)
    assert total >= first + 0.02
    assert total < first + 5


def test_timer_elapsed_reset():
    timer = Timers()("step")
    timer.start()
    time.sleep(0.01)
    timer.stop()
    assert timer.elapsed(reset=True) >= 0.01
    assert timer.elapsed(reset=False) == 0.0


def test_timer_elapsed_while_running_includes_the_running_interval():
    timer = Timers()("step")
    timer.start()
    time.sleep(0.02)
    assert timer.elapsed(reset=False) >= 0.02
    assert timer.active
    timer.stop()
    assert not timer.active


def test_timer_elapsed_reset_while_running_restarts_the_interval():
    timer = Timers()("step")
    timer.start()
    time.sleep(0.3)
    assert timer.elapsed(reset=True) >= 0.3
    assert timer.active
    timer.stop()
    # Only the moment between the reset and the stop is left.
    assert timer.elapsed(reset=False) < 0.3


def test_timer_misuse_is_an_error():
    timer = Timers()("step")
    with pytest.raises(AssertionError):
        timer.stop()
    timer.start()
    with pytest.raises(AssertionError):
        timer.start()


# ----------------------------------------------------------------------------------------- GlobalState


def test_global_state_holds_config_counters_and_timers():
    cfg = make_tiny_config()
    state = GlobalState(cfg)
    assert state.cfg is cfg
    assert isinstance(state.train_state, TrainState)
    assert state.train_state == TrainState()
    assert isinstance(state.timers, Timers)
    assert state.tensorboard_logger is None
    assert state.wandb_logger is None
    state.close_loggers()


def test_global_state_without_config():
    state = GlobalState()
    assert state.cfg is None
    assert state.tensorboard_logger is None


def test_global_state_tensorboard_logger(tmp_path):
    tb_dir = tmp_path / "tb"
    state = GlobalState(make_tiny_config(logger__tensorboard_dir=str(tb_dir)))
    writer = state.tensorboard_logger
    assert writer is not None
    assert state.tensorboard_logger is writer
    writer.add_scalar("x", 1.0, 1)
    state.close_loggers()
    assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())


class WhatRuns:
    """Records `do_train`, `do_valid`, `do_test` as the first event of the run sees them."""

    def __init__(self):
        from megatron.bridge.training.callbacks import CallbackManager

        self.seen = None
        self.manager = CallbackManager()
        for event in ("on_train_start", "on_eval_start"):
            self.manager.register(event, self.record)

    def record(self, context):
        state = context.state.train_state
        self.seen = self.seen or (state.do_train, state.do_valid, state.do_test)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, (True, True, True)),
    ({"validation__skip_train": True}, (False, True, True)),
    ({"validation__eval_iters": 0}, (True, False, False)),
])
def test_do_train_valid_test_are_set_from_the_config_at_start(overrides, expected):
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    probe = WhatRuns()
    pretrain(make_tiny_config(train__train_iters=1, **overrides), forward_step, callbacks=probe.manager)
    assert probe.seen == expected


def test_global_state_timers_follow_the_logger_s_timing_level():
    from megatron.bridge.training.timers import DummyTimer, Timer

    assert isinstance(GlobalState(make_tiny_config()).timers("fwd", log_level=1), DummyTimer)  # default level 0
    state = GlobalState(make_tiny_config(logger__timing_log_level=1, logger__timing_log_option="all"))
    assert isinstance(state.timers("fwd", log_level=1), Timer)
    assert isinstance(state.timers("finer", log_level=2), DummyTimer)
    assert state.timers.get_all_timers_string(["fwd"]) is None  # nothing measured yet
