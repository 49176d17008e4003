"""Megatron's `Timers` API on `context.state.timers`: levels, dummies, log and write across ranks, the loop's timers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from helpers import make_tiny_config
from megatron.bridge.training import timers as timers_module
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.metrics import LOOP_TIMERS
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.timers import DummyTimer, Timer, Timers


class FakeClock:
    """Stands in for `time.perf_counter` inside the timers module: time moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timers_module, "time", SimpleNamespace(perf_counter=fake))
    return fake


def _run(timer, clock, seconds):
    timer.start()
    clock.now += seconds
    timer.stop()


# ----------------------------------------------------------------------------------------- levels


def test_a_timer_above_the_timing_level_is_a_no_op_dummy():
    timers = Timers(log_level=0, log_option="minmax")
    assert isinstance(timers("interval-time", log_level=0), Timer)
    dummy = timers("forward-backward", log_level=1)
    assert isinstance(dummy, DummyTimer) and not dummy.active
    dummy.start(barrier=False)
    dummy.start()  # a dummy is never "already started"
    dummy.stop()
    dummy.reset()
    with pytest.raises(RuntimeError, match="timing_log_level"):
        dummy.elapsed()
    # As in Megatron: without a level a timer is of the finest level, 2.
    assert isinstance(timers("mine"), DummyTimer)
    assert timers.names() == ["interval-time"]


def test_levels_up_to_the_timing_level_give_real_timers_and_a_level_is_kept():
    timers = Timers(log_level=1)
    assert isinstance(timers("a", log_level=1), Timer) and isinstance(timers("b", log_level=2), DummyTimer)
    assert timers("a") is timers("a", log_level=1)
    with pytest.raises(ValueError, match="'a' exists with log_level 1, not 0"):
        timers("a", log_level=0)
    with pytest.raises(ValueError, match="log_level 3"):
        timers("c", log_level=3)
    with pytest.raises(ValueError, match="not one of"):
        Timers(log_level=0, log_option="mean")
    with pytest.raises(ValueError, match="0, 1, 2"):
        Timers(log_level=5)


# ------------------------------------------------------------------------------------ one timer


def test_start_stop_elapsed_and_reset_follow_megatron(clock):
    timer = Timers()("step", log_level=0)
    _run(timer, clock, 2.0)
    _run(timer, clock, 0.5)
    assert timer.elapsed(reset=False) == 2.5
    timer.start(barrier=True)  # no process group: the barrier is a no-op
    clock.now += 1.0
    assert timer.elapsed(reset=True) == 3.5  # the running interval counts, and goes on running
    assert timer.active
    clock.now += 0.25
    timer.stop(barrier=True)
    assert timer.elapsed() == 0.25
    timer.start()
    timer.reset()  # as in Megatron: zeroes and stops, dropping the running interval
    assert not timer.active and timer.elapsed(reset=False) == 0.0


class FakeEvent:
    """Stands in for `torch.cuda.Event` (no GPU here): the fake device passes an event when told to."""

    passed_up_to = 0.0  # the device has run everything recorded up to this fake time
    synchronized = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.time = None

    def record(self):
        self.time = FakeEvent.clock.now

    def query(self):
        return self.time <= FakeEvent.passed_up_to

    def synchronize(self):
        FakeEvent.synchronized += 1
        FakeEvent.passed_up_to = max(FakeEvent.passed_up_to, self.time)

    def elapsed_time(self, end):
        assert self.query() and end.query(), "CUDA refuses elapsed_time before both events were reached"
        return 1000.0 * (end.time - self.time)


def test_while_cuda_is_in_use_a_timer_records_events_and_waits_only_when_read(clock, monkeypatch):
    import torch

    FakeEvent.clock, FakeEvent.passed_up_to, FakeEvent.synchronized = clock, 0.0, 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timers_module, "_cuda_in_use", lambda: True)
    timer = Timers()("forward-backward", log_level=1)
    for _ in range(3):
        _run(timer, clock, 2.0)
    assert FakeEvent.synchronized == 0 and len(timer._pending) == 3  # the device is behind: nothing waited for
    FakeEvent.passed_up_to = clock.now
    _run(timer, clock, 1.0)  # a stop folds what the device has passed, still without waiting
    assert FakeEvent.synchronized == 0 and len(timer._pending) == 1
    assert timer.elapsed() == 7.0 and FakeEvent.synchronized == 1  # the read waits for the last stop


# --------------------------------------------------------------------------------- log and write


DOTS = "forward ".ljust(48, ".")  # Megatron's layout: the name padded with dots to 48 characters


@pytest.mark.parametrize(("option", "expected"), [
    ("max", f"max time across ranks (ms):\n    {DOTS}: 750.00"),
    ("minmax", f"(min, max) time across ranks (ms):\n    {DOTS}: (750.00, 750.00)"),
    ("all", "times across ranks (ms):\n  forward:\n     rank  0: 750.00"),
])
def test_log_prints_the_option_s_table_normalised_and_leaves_out_idle_timers(clock, capsys, option, expected):
    timers = Timers(log_level=2, log_option=option)
    _run(timers("forward", log_level=1), clock, 1.5)
    timers("idle", log_level=1)
    timers.log(["forward", "idle", "never-made"], normalizer=2)
    assert capsys.readouterr().out == expected + "\n"
    timers.log(["forward"])  # reset=True zeroed it: nothing measured, nothing printed
    assert capsys.readouterr().out == ""


def test_write_puts_seconds_under_name_time_and_keeps_the_totals_by_default(clock, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    timers = Timers(log_level=1)
    _run(timers("optimizer", log_level=1), clock, 3.0)
    writer = SummaryWriter(str(tmp_path))
    timers.write(["optimizer"], writer, 7, normalizer=3)
    timers.write(["optimizer"], writer, 8, reset=True)
    timers.write(["optimizer"], None, 9)  # no writer: nothing written, nothing measured
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == ["optimizer-time"]
    assert [(e.step, e.value) for e in events.Scalars("optimizer-time")] == [(7, pytest.approx(1.0)), (8, 3.0)]
    assert timers("optimizer").elapsed() == 0.0


def test_write_to_a_wandb_like_writer_uses_log(clock):
    logged = []
    writer = SimpleNamespace(log=lambda data, step: logged.append((data, step)))
    timers = Timers(log_level=0)
    _run(timers("interval-time", log_level=0), clock, 2.0)
    timers.write(["interval-time"], writer, 4, normalizer=2)
    assert logged == [({"interval-time-time": 1.0}, 4)]


_TWO_RANKS = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from types import SimpleNamespace
    import torch.distributed as dist
    from megatron.bridge.training import timers as timers_module
    from megatron.bridge.training.timers import Timers

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    now = [0.0]
    timers_module.time = SimpleNamespace(perf_counter=lambda: now[0])
    out = {}
    for option in ("max", "minmax", "all"):
        timers = Timers(log_level=1, log_option=option)
        for name, seconds in (("both", 1.0 + rank), ("rank1-only", 5.0 if rank else 0.0)):
            timer = timers(name, log_level=1)
            timer.start()
            now[0] += seconds
            timer.stop()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            timers.log(["both", "rank1-only"], reset=False)  # rank None: the last rank prints
        out[option] = printed.getvalue()
        out[option + "-string"] = timers.get_all_timers_string(["both", "rank1-only"], normalizer=2)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


def test_log_gathers_every_rank_s_times(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path)],
                          env=env, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    row = "    {} ".format
    assert rank0["minmax"] == "" and rank1["minmax"].splitlines() == [
        "(min, max) time across ranks (ms):",
        row("both").ljust(52, ".") + ": (1000.00, 2000.00)",
        row("rank1-only").ljust(52, ".") + ": (5000.00, 5000.00)",  # a rank without the timer is left out
    ]
    assert rank1["max"].splitlines()[1:] == [row("both").ljust(52, ".") + ": 2000.00",
                                              row("rank1-only").ljust(52, ".") + ": 5000.00"]
    assert rank1["all"].splitlines() == ["times across ranks (ms):", "  both:", "     rank  0: 1000.00",
                                         "     rank  1: 2000.00", "  rank1-only:", "     rank  1: 5000.00"]
    assert rank0["minmax-string"] == rank1["minmax-string"]  # every rank gets the gathered text
    assert "(500.00, 1000.00)" in rank0["minmax-string"]


# ------------------------------------------------------------------------------------- the loop


class TimersSeen(Callback):
    def on_train_end(self, context):
        self.names = context.state.timers.names()


def test_the_loop_times_its_phases_and_prints_them_after_each_log_line(chdir, capsys):
    seen = TimersSeen()
    pretrain(make_tiny_config(train__train_iters=3, logger__log_interval=2, logger__timing_log_level=1),
             forward_step, callbacks=[seen])
    assert sorted(seen.names) == sorted(["interval-time", *LOOP_TIMERS])
    lines = capsys.readouterr().out.splitlines()
    log_lines = [i for i, line in enumerate(lines) if "consumed samples:" in line]
    assert len(log_lines) == 3  # iterations 1, 2 and 3
    for i in log_lines:
        assert lines[i + 1] == "(min, max) time across ranks (ms):"
        rows = lines[i + 2:i + 2 + len(LOOP_TIMERS)]
        assert [row.split()[0] for row in rows] == list(LOOP_TIMERS)
        shortest, longest = (float(x) for x in rows[0].split(": (")[1].rstrip(")").split(", "))
        assert 0 < shortest == longest  # one rank


def test_by_default_only_the_iteration_time_is_timed(chdir, capsys):
    seen = TimersSeen()
    pretrain(make_tiny_config(train__train_iters=2), forward_step, callbacks=[seen])
    assert seen.names == ["interval-time"]
    assert "time across ranks" not in capsys.readouterr().out


class StepTimer(Callback):
    """The callback guide's timer example (docs/callbacks.md, "Timers: state.timers")."""

    def on_train_step_start(self, context):
        context.state.timers("my-step", log_level=0).start(barrier=False)

    def on_train_step_end(self, context):
        timers = context.state.timers
        timers("my-step").stop()
        if (context.state.train_state.step + 1) % 5 == 0:
            # On every rank (the times are gathered); write first: it keeps the totals, log resets them.
            timers.write(["my-step"], context.state.tensorboard_logger, context.state.train_state.step + 1,
                         normalizer=5)
            timers.log(["my-step"], normalizer=5)


def test_the_guide_s_megatron_style_timer_callback(chdir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(make_tiny_config(train__train_iters=10, logger__tensorboard_dir=str(chdir / "tb")), forward_step,
             callbacks=[StepTimer()])
    out = capsys.readouterr().out
    assert out.count("(min, max) time across ranks (ms):\n    my-step ....") == 2
    events = EventAccumulator(str(chdir / "tb"))
    events.Reload()
    points = events.Scalars("my-step-time")
    assert [p.step for p in points] == [5, 10] and all(0 < p.value < 60 for p in points)
