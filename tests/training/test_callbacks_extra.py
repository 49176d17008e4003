"""Callbacks beyond the guide (issue #6): everything here is additive to the documented API.

(a) callback state and `user_state` survive a resume exactly (in-process with `exit_interval`, and
    a real SIGKILL of a subprocess); (b) values that cannot be saved; (c) state keys;
(d) `request_stop` / `request_checkpoint` / `request_validation`; (e) a stop asked on one rank of
two; (f) `every=N` filters; (g) `stats()` and the log line's callback share; (h) the ready-made
callbacks; (i) compatibility with callbacks written for upstream.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers import make_tiny_config
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.training.builtin_callbacks import (
    EarlyStopping,
    JSONLMetricsWriter,
    LossSpikeGuard,
    ThroughputMonitor,
)
from megatron.bridge.training.callbacks import (
    VALID_EVENTS,
    Callback,
    CallbackContext,
    CallbackManager,
    normalize_callbacks,
)
from megatron.bridge.training.exit_conditions import ExitConditions
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.state import GlobalState, RunRequests

TESTS_DIR = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 120
RANK_TIMEOUT_S = 90


# ------------------------------------------------------------------------------------------- helpers


class History(Callback):
    """Accumulates into `user_state`: a counter, a list of losses, a tuple, tensors and a nested dict.

    Initialises with `setdefault`, so a resumed run keeps what the checkpoint restored.
    """

    def on_train_start(self, context):
        us = context.user_state
        us.setdefault("steps", 0)
        us.setdefault("losses", [])
        us.setdefault("last", ("none", -1))
        us.setdefault("loss_tensor", torch.zeros(0))
        us.setdefault("int_tensor", torch.zeros(2, 0, dtype=torch.int64))
        us.setdefault("nested", {"evals": []})

    def on_train_step_end(self, context):
        us = context.user_state
        step = context.state.train_state.step + 1
        loss = context.loss_dict["lm loss"].detach().float().reshape(1)
        us["steps"] += 1
        us["losses"].append(float(loss))
        us["last"] = (step, float(loss))
        us["loss_tensor"] = torch.cat([us["loss_tensor"], loss])
        us["int_tensor"] = torch.cat([us["int_tensor"], torch.tensor([[step], [step * step]])], dim=1)

    def on_eval_end(self, context):
        context.user_state["nested"]["evals"].append((context.state.train_state.step,
                                                      float(context.total_loss_dict["lm loss"])))


def to_json(value: Any) -> Any:
    """A JSON form that keeps tuples and tensors (dtype, shape, values) apart from lists."""
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, tuple):
        return {"tuple": [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Equal values of equal types, recursively; tensors bit for bit with the same dtype and shape."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


class Final(Callback):
    """Snapshots the EarlyStopping counters and `user_state` when training ends."""

    def __init__(self, early: EarlyStopping):
        self.early, self.snapshot = early, None

    def on_train_end(self, context):
        self.snapshot = {"early": dict(self.early.state_dict()), "step": context.state.train_state.step,
                         "user_state": copy.deepcopy(context.user_state)}


class StepsSeen(Callback):
    """Records `train_state.step` at every on_train_step_end (and optionally asks for things)."""

    def __init__(self, asks: dict[int, tuple[str, str]] | None = None):
        self.steps: list[int] = []
        self.asks = asks or {}

    def on_train_step_end(self, context):
        step = context.state.train_state.step
        self.steps.append(step)
        if step in self.asks:
            what, reason = self.asks[step]
            getattr(context.state, f"request_{what}")(reason)


class Counter(Callback):
    """Counts events and records the step each one saw."""

    def __init__(self):
        self.seen: dict[str, list[int]] = {}

    def _record(self, name, context):
        self.seen.setdefault(name, []).append(context.state.train_state.step)

    def on_train_end(self, context):
        self._record("on_train_end", context)

    def on_eval_start(self, context):
        self._record("on_eval_start", context)

    def on_test_start(self, context):
        self._record("on_test_start", context)

    def on_checkpoint_save(self, context):
        self._record("on_checkpoint_save", context)


def rank_state(save: Path, step: int, rank: int = 0) -> dict[str, Any]:
    """The decoded callback state and user_state a checkpoint holds for one rank."""
    raw = checkpoint_io.read_json(checkpoint_io.iteration_dir(save, step) / f"rank_{rank:05d}.json")
    return {"callbacks": checkpoint_io.decode_value(raw["callbacks"]),
            "user_state": checkpoint_io.decode_value(raw["user_state"])}


def tracker(save: Path) -> int:
    return int((save / checkpoint_io.TRACKER_FILE).read_text())


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


# ------------------------------------------------------------------- (a) state that survives resume

# Resume variants: EarlyStopping never triggers (patience 100), stopped after step 7 with counters
# best=<loss at 3>, bad_passes=1; the same with the stop at step 2, before any validation (so `best` is
# still inf in the checkpoint); or it triggers at step 8, after a resume from step 5 (bad_passes=1).
RESUME_CASES = {
    "no_trigger": dict(train_iters=12, eval_interval=3, patience=100, exit_interval=7, final_step=12),
    "before_first_validation": dict(train_iters=12, eval_interval=3, patience=100, exit_interval=2, final_step=12),
    "trigger_after_resume": dict(train_iters=12, eval_interval=2, patience=3, exit_interval=5, final_step=8),
}


def _resume_config(case: dict[str, Any], save: Path, exit_interval: int | None):
    return make_tiny_config(train__train_iters=case["train_iters"], train__exit_interval=exit_interval,
                            validation__eval_interval=case["eval_interval"], checkpoint__save=str(save),
                            checkpoint__load=str(save))


def _resume_run(case, save: Path, exit_interval: int | None):
    early = EarlyStopping(patience=case["patience"], min_delta=1e9, name="es-main")  # only the first pass improves
    final, filtered = Final(early), []
    manager = CallbackManager()
    manager.add([History(), early, final])
    manager.register("on_train_step_end", lambda ctx: filtered.append(ctx.state.train_state.step), every=4)
    pretrain(_resume_config(case, save, exit_interval), forward_step, callbacks=manager)
    return early, final.snapshot, filtered


@pytest.mark.parametrize("case_name", sorted(RESUME_CASES))
def test_state_survives_resume_in_process(case_name, tmp_path, chdir):
    case = RESUME_CASES[case_name]
    _, full, full_filtered = _resume_run(case, tmp_path / "full", None)
    assert full["step"] == case["final_step"]
    assert full["user_state"]["steps"] == case["final_step"]
    assert full["early"]["bad_passes"] == (case["final_step"] // case["eval_interval"] - 1)

    _, first, first_filtered = _resume_run(case, tmp_path / "resumed", case["exit_interval"])
    assert first is None, "an exit_interval stop is an early stop: no on_train_end"
    assert tracker(tmp_path / "resumed") == case["exit_interval"]
    saved = rank_state(tmp_path / "resumed", case["exit_interval"])
    assert saved["user_state"]["steps"] == case["exit_interval"]
    assert "es-main" in saved["callbacks"]
    if case_name == "before_first_validation":
        assert saved["callbacks"]["es-main"] == {"best": math.inf, "bad_passes": 0}
    else:
        assert saved["callbacks"]["es-main"]["bad_passes"] == 1 and math.isfinite(saved["callbacks"]["es-main"]["best"])

    early, resumed, resumed_filtered = _resume_run(case, tmp_path / "resumed", None)
    assert resumed is not None and resumed["step"] == case["final_step"]
    assert_identical(resumed["early"], full["early"], "early")
    assert_identical(resumed["user_state"], full["user_state"], "user_state")
    # every=4 counts training steps, so it survives the resume: steps 3, 7, 11, split over both parts.
    assert first_filtered + resumed_filtered == full_filtered == [s for s in (3, 7, 11) if s < case["final_step"]]


KILL_SCRIPT = '''
import json, sys, time
from typing import Any
sys.path.insert(0, {tests_dir!r})
import torch
torch.set_num_threads(1)
from helpers import make_tiny_config
from megatron.bridge.training.builtin_callbacks import EarlyStopping
from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

{history}

{to_json}

args = json.loads(sys.argv[1])
early = EarlyStopping(patience=3, min_delta=1e9)


class Report(Callback):
    def on_train_start(self, context):
        self.start = context.state.train_state.step

    def on_train_step_start(self, context):
        if args["slow"]:
            # Slow enough for the parent to kill us between two checkpoints; never reach the stop at step 8.
            time.sleep(600 if context.state.train_state.step >= 7 else 0.05)

    def on_train_end(self, context):
        out = {{"start": self.start, "step": context.state.train_state.step, "early": early.state_dict(),
                "user_state": to_json(context.user_state)}}
        with open(args["out"], "w") as f:
            json.dump(out, f)


manager = CallbackManager()
manager.add([History(), early, Report()])
cfg = make_tiny_config(train__train_iters=12, validation__eval_interval=2, checkpoint__save=args["save"],
                       checkpoint__load=args["save"], checkpoint__save_interval=2)
pretrain(cfg, forward_step, callbacks=manager)
'''


def _kill_script(tmp_path: Path) -> Path:
    script = tmp_path / "kill_worker.py"
    script.write_text(KILL_SCRIPT.format(tests_dir=str(TESTS_DIR), history=inspect.getsource(History),
                                         to_json=inspect.getsource(to_json)))
    return script


def _spawn(script: Path, save: Path, out: Path, slow: bool) -> subprocess.Popen:
    args = json.dumps({"save": str(save), "out": str(out), "slow": slow})
    return subprocess.Popen([sys.executable, str(script), args], cwd=script.parent, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker did not finish within {SUBPROCESS_TIMEOUT_S} s:\n"
                             f"{proc.communicate()[0][-4000:]}") from None
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def test_state_survives_sigkill_and_resume(tmp_path):
    """A real kill: SIGKILL once a checkpoint at step >= 4 exists, resume in a new process.

    EarlyStopping (patience 3, only the first validation improves) stops the uninterrupted run at
    step 8; the resumed run only gets there if the counters it restored are right.
    """
    script = _kill_script(tmp_path)
    full = _spawn(script, tmp_path / "full", tmp_path / "full.json", slow=False)
    full_output = _finish(full)

    save = tmp_path / "killed"
    victim = _spawn(script, save, tmp_path / "killed.json", slow=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while not ((save / checkpoint_io.TRACKER_FILE).exists() and tracker(save) >= 4):
            assert victim.poll() is None, "the worker ended before it was killed:\n" + victim.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint at step >= 4 in time"
            time.sleep(0.01)
        assert victim.poll() is None
        victim.send_signal(signal.SIGKILL)
        killed_output, _ = victim.communicate(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.json").exists(), "on_train_end must not have fired in the killed run"
    saved_steps = checkpoint_io.list_iterations(save)
    assert saved_steps and saved_steps[-1] in (4, 6), (saved_steps, killed_output[-3000:])

    resumed_output = _finish(_spawn(script, save, tmp_path / "resumed.json", slow=False))
    full_result = json.loads((tmp_path / "full.json").read_text())
    resumed_result = json.loads((tmp_path / "resumed.json").read_text())
    assert full_result["start"] == 0 and full_result["step"] == 8, full_output[-3000:]
    assert resumed_result["start"] == saved_steps[-1], resumed_output[-3000:]
    assert "has not improved" in full_output and "has not improved" in resumed_output
    assert resumed_result["step"] == 8
    assert resumed_result["early"] == full_result["early"]
    assert full_result["early"]["bad_passes"] == 3
    assert resumed_result["user_state"] == full_result["user_state"]
    assert full_result["user_state"]["steps"] == 8 and len(full_result["user_state"]["losses"]) == 8
    assert full_result["user_state"]["last"] == {"tuple": [8, full_result["user_state"]["losses"][-1]]}


# --------------------------------------------------------------------------- (b) unsavable values


def test_unsavable_user_state_is_named_in_a_warning_and_the_rest_is_saved(tmp_path, chdir, capsys):
    def fill(context):
        context.user_state.update(ok=3, fn=lambda: 1, tags={1, 2}, inner={"fine": (1, 2.5), "bad": object()})

    manager = CallbackManager()
    manager.register("on_train_start", fill)
    pretrain(make_tiny_config(train__train_iters=2, checkpoint__save=str(tmp_path / "ck")), forward_step,
             callbacks=manager)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning" in line and "not saved" in line]
    assert len(warnings) == 1, out
    for key in ("user_state.fn", "user_state.tags", "user_state.inner.bad"):
        assert key in warnings[0], warnings[0]
    assert "user_state.ok" not in warnings[0]
    saved = rank_state(tmp_path / "ck", 2)["user_state"]
    assert_identical(saved, {"ok": 3, "inner": {"fine": (1, 2.5)}})


class BadState(Callback):
    def on_train_step_end(self, context):
        pass

    def state_dict(self):
        return {"handle": object()}

    def load_state_dict(self, state):
        pass


def test_callback_state_that_cannot_be_saved_raises_naming_the_callback(tmp_path, chdir):
    with pytest.raises(ValueError, match=r"BadState\.handle"):
        pretrain(make_tiny_config(train__train_iters=2, checkpoint__save=str(tmp_path / "ck")), forward_step,
                 callbacks=[BadState()])
    assert checkpoint_io.list_iterations(tmp_path / "ck") == []


# ------------------------------------------------------------------------------------ (c) state keys


def test_duplicate_state_keys_are_refused_and_distinct_names_accepted(tmp_path, chdir):
    manager = CallbackManager()
    manager.add(EarlyStopping())
    with pytest.raises(ValueError, match="name") as err:
        manager.add(EarlyStopping())
    assert "EarlyStopping" in str(err.value)
    with pytest.raises(ValueError, match="name"):
        normalize_callbacks([LossSpikeGuard(name="guard"), LossSpikeGuard(name="guard")])

    fast, slow = EarlyStopping(name="fast", patience=1000), EarlyStopping(name="slow", patience=1000, min_delta=1e9)
    manager = CallbackManager()
    manager.add([fast, slow, EarlyStopping(patience=1000)])  # the third one is keyed by its class name
    pretrain(make_tiny_config(train__train_iters=2, validation__eval_interval=1, checkpoint__save=str(tmp_path)),
             forward_step, callbacks=manager)
    saved = rank_state(tmp_path, 2)["callbacks"]
    assert sorted(saved) == ["EarlyStopping", "fast", "slow"]
    # Validation after steps 1 and 2 (then the post-training pass, after the save): only the first improves
    # by more than min_delta=1e9, while the losses fall, so each pass improves on its predecessor.
    assert saved["slow"]["bad_passes"] == 1 and saved["fast"]["bad_passes"] == 0
    assert saved["slow"]["best"] > saved["fast"]["best"] == saved["EarlyStopping"]["best"]


# -------------------------------------------------------------------------------------- (d) requests


def test_request_stop_after_the_fifth_step(tmp_path, chdir, capsys):
    asker, counter = StepsSeen({4: ("stop", "enough of this, says the test")}), Counter()
    manager = CallbackManager()
    manager.add([History(), asker, counter])
    cfg = make_tiny_config(train__train_iters=12, checkpoint__save=str(tmp_path / "ck"),
                           checkpoint__save_interval=100, validation__eval_iters=2)
    pretrain(cfg, forward_step, callbacks=manager)
    out = capsys.readouterr().out
    assert asker.steps == [0, 1, 2, 3, 4]
    assert counter.seen["on_train_end"] == [5]
    assert counter.seen["on_eval_start"] == [5] and counter.seen["on_test_start"] == [5]
    assert counter.seen["on_checkpoint_save"] == [5]
    assert checkpoint_io.list_iterations(tmp_path / "ck") == [5] and tracker(tmp_path / "ck") == 5
    # The checkpoint was captured after the fifth step's callbacks had run.
    assert rank_state(tmp_path / "ck", 5)["user_state"]["steps"] == 5
    stop_lines = [line for line in out.splitlines() if "enough of this, says the test" in line]
    assert any("stopping after iteration 5" in line for line in stop_lines), out


def test_request_checkpoint_saves_at_that_step_and_training_goes_on(tmp_path, chdir):
    asker, counter = StepsSeen({3: ("checkpoint", "a snapshot please")}), Counter()
    pretrain(make_tiny_config(train__train_iters=8, checkpoint__save=str(tmp_path), checkpoint__save_interval=100),
             forward_step, callbacks=[asker, counter])
    assert asker.steps == list(range(8))
    assert checkpoint_io.list_iterations(tmp_path) == [4, 8]
    assert counter.seen["on_checkpoint_save"] == [4, 8] and counter.seen["on_train_end"] == [8]


def test_request_checkpoint_without_checkpoint_save_is_reported(chdir, capsys):
    asker = StepsSeen({1: ("checkpoint", "x")})
    pretrain(make_tiny_config(train__train_iters=3), forward_step, callbacks=[asker])
    assert "checkpoint was requested at iteration 2 but checkpoint.save is not set" in capsys.readouterr().out
    assert asker.steps == [0, 1, 2]


@pytest.mark.parametrize(("eval_interval", "expected"), [(None, [4, 8]), (4, [4, 8, 8])])
def test_request_validation_runs_one_extra_pass(eval_interval, expected, chdir):
    """An extra pass at the requested step; none when that step validates anyway."""
    asker, counter = StepsSeen({3: ("validation", "how are we doing")}), Counter()
    pretrain(make_tiny_config(train__train_iters=8, validation__eval_interval=eval_interval), forward_step,
             callbacks=[asker, counter])
    assert counter.seen["on_eval_start"] == expected
    assert asker.steps == list(range(8))


def test_requested_validation_is_in_the_checkpoint_of_its_step(tmp_path, chdir):
    """State is captured after the step's callbacks, including a validation pass one of them asked for.

    Requested validation at iteration 4, a checkpoint every 4 steps: resuming from iteration 4 must give
    the same validation history (and validation data position) as the uninterrupted run.
    """

    def run(save: Path, exit_interval: int | None) -> dict[str, Any]:
        manager = CallbackManager()
        manager.add([History(), StepsSeen({3: ("validation", "mid-run check")})])
        cfg = make_tiny_config(train__train_iters=8, train__exit_interval=exit_interval,
                               checkpoint__save=str(save), checkpoint__save_interval=4)
        pretrain(cfg, forward_step, callbacks=manager)
        return copy.deepcopy(manager.user_state)

    full = run(tmp_path / "full", None)
    assert [step for step, _ in full["nested"]["evals"]] == [4, 8]
    run(tmp_path / "resumed", 4)
    resumed = run(tmp_path / "resumed", None)
    assert_identical(resumed["nested"], full["nested"], "nested")
    assert [step for step, _ in rank_state(tmp_path / "resumed", 4)["user_state"]["nested"]["evals"]] == [4]


# --------------------------------------------------------------------- (e) a stop asked on one rank

RANK_SCRIPT = '''
import json, sys
sys.path.insert(0, {tests_dir!r})
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from helpers import make_tiny_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

out, save = sys.argv[1], sys.argv[2]
record = {{"steps": [], "train_end": None}}


class OnlyRankOneStops(Callback):
    def on_train_step_end(self, context):
        record["rank"] = dist.get_rank()
        record["steps"].append(context.state.train_state.step)
        if dist.get_rank() == 1 and context.state.train_state.step == 4:
            context.state.request_stop("rank one has seen enough")

    def on_train_end(self, context):
        record["train_end"] = context.state.train_state.step


cfg = make_tiny_config(train__train_iters=12, checkpoint__save=save, checkpoint__save_interval=100)
pretrain(cfg, forward_step, callbacks=[OnlyRankOneStops()])
with open(f"{{out}}/rank{{record['rank']}}.json", "w") as f:
    json.dump(record, f)
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stop_requested_on_one_rank_stops_both(tmp_path):
    script = tmp_path / "rank_worker.py"
    script.write_text(RANK_SCRIPT.format(tests_dir=str(TESTS_DIR)))
    out, save = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(script), str(out), str(save)]
    # A session of its own, so that a hung launcher is ended together with its workers.
    proc = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RANK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        finished = sorted(path.name for path in out.iterdir())
        raise AssertionError(f"the 2-rank run did not exit within {RANK_TIMEOUT_S} s; finished: {finished}\n"
                             f"{stdout[-3000:]}\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-6000:]}"
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank
        assert record["steps"] == [0, 1, 2, 3, 4], record
        assert record["train_end"] == 5, record
    assert checkpoint_io.list_iterations(save) == [5] and tracker(save) == 5
    assert "rank one has seen enough" in stdout
    assert "stopping after iteration 5" in stdout


def test_requests_are_combined_by_one_cpu_all_reduce_only_when_some_rank_has_callbacks(monkeypatch):
    from megatron.bridge.training import exit_conditions

    reduced: list[torch.Tensor] = []
    other_rank_has_callbacks = False

    def fake_all_reduce(tensor, op=None, group=None):
        assert group == "gloo group" and tensor.device.type == "cpu"
        reduced.append(tensor.clone())
        if tensor.numel() == 1:  # the agreement on whether to combine at all
            tensor[0] = max(float(tensor[0]), float(other_rank_has_callbacks))
        else:
            tensor[3] = 1.0  # "another rank" asked for a checkpoint

    monkeypatch.setattr(exit_conditions.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(exit_conditions.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(exit_conditions.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(exit_conditions.dist, "new_group", lambda backend=None, **kwargs: "gloo group")
    monkeypatch.setattr(exit_conditions.dist, "all_reduce", fake_all_reduce)
    config = make_tiny_config().train

    with ExitConditions(config, start_time=time.time(), requests_possible=False) as quiet:
        decision = quiet.check(1, RunRequests())
    assert len(reduced) == 1, "only the agreement: no rank has callbacks"
    assert decision.stop_reason is None and decision.checkpoint_reason is None

    reduced.clear()
    with ExitConditions(config, start_time=time.time(), requests_possible=True) as listening:
        requests = RunRequests(stop="local reason")
        decision = listening.check(1, requests)
    assert len(reduced) == 2 and reduced[1].numel() <= 8
    assert "local reason" in decision.stop_reason and not decision.early
    assert decision.checkpoint_reason == "asked on another rank"
    assert requests == RunRequests(), "requests are cleared once combined"

    # Callbacks on another rank only: this rank must take part in every step's combination too.
    reduced.clear()
    other_rank_has_callbacks = True
    with ExitConditions(config, start_time=time.time(), requests_possible=False) as follower:
        decision = follower.check(1, RunRequests())
    assert len(reduced) == 2 and decision.checkpoint_reason == "asked on another rank"


# ----------------------------------------------------------------------------------- (f) filters


class EveryFourInt(Callback):
    fire_every = 4

    def __init__(self):
        self.steps = []

    def on_train_step_end(self, context):
        self.steps.append(context.state.train_state.step)


class EveryFourDict(EveryFourInt):
    fire_every = {"on_train_step_end": 4}


class EveryFourStart(Callback):
    fire_every = {"on_train_step_start": 4, "on_eval_end": 2}

    def __init__(self):
        self.steps, self.evals, self.step_ends = [], [], []

    def on_train_step_start(self, context):
        self.steps.append(context.state.train_state.step)

    def on_train_step_end(self, context):  # not in the dict: unfiltered
        self.step_ends.append(context.state.train_state.step)

    def on_eval_end(self, context):
        self.evals.append(context.state.train_state.step)


def test_every_filters_in_a_run(chdir):
    by_register, evals_by_register = [], []
    manager = CallbackManager()
    manager.register("on_train_step_end", lambda ctx: by_register.append(ctx.state.train_state.step), every=4)
    # In-training validation at 3, 6, 9, 12, then the post-training pass: 5 fires; every 2nd is 6 and 12.
    manager.register("on_eval_end", lambda ctx: evals_by_register.append(ctx.state.train_state.step), every=2)
    as_int, as_dict, start = EveryFourInt(), EveryFourDict(), EveryFourStart()
    manager.add([as_int, as_dict, start])
    pretrain(make_tiny_config(train__train_iters=12, validation__eval_interval=3), forward_step, callbacks=manager)
    assert by_register == as_int.steps == as_dict.steps == start.steps == [3, 7, 11]
    assert start.step_ends == list(range(12))
    assert evals_by_register == start.evals == [6, 12]
    stats = manager.stats()
    assert stats["on_train_step_end"]["EveryFourInt.on_train_step_end"]["calls"] == 3
    assert stats["on_eval_end"]["EveryFourStart.on_eval_end"]["calls"] == 2


def _ctx(step: int) -> CallbackContext:
    return CallbackContext(state=SimpleNamespace(train_state=SimpleNamespace(step=step)), model=[])


def test_every_counts_fires_for_other_events():
    calls = []
    manager = CallbackManager()
    manager.register("on_checkpoint_save", lambda ctx: calls.append(ctx.state.train_state.step), every=3)
    for step in range(10):
        manager.fire("on_checkpoint_save", _ctx(step))
    assert calls == [2, 5, 8]


@pytest.mark.parametrize("bad", [0, -1, "x", 2.0, True])
def test_invalid_every_is_refused(bad):
    manager = CallbackManager()
    with pytest.raises(ValueError, match="every"):
        manager.register("on_train_step_end", lambda ctx: None, every=bad)

    class BadInt(Callback):
        fire_every = bad

        def on_train_step_end(self, context):
            pass

    class BadDict(BadInt):
        fire_every = {"on_train_step_end": bad}

    for cls in (BadInt, BadDict):
        with pytest.raises(ValueError, match="every"):
            manager.add(cls())
    assert manager.list_callbacks("on_train_step_end") == []


def test_every_dict_with_an_unknown_event_is_refused():
    """A misspelled event name in `every` would silently disable the filter; it is refused like register's."""

    class Typo(Callback):
        fire_every = {"on_train_step_ends": 4}

        def on_train_step_end(self, context):
            pass

    with pytest.raises(ValueError, match="Unknown event"):
        CallbackManager().add(Typo())


# ------------------------------------------------------------------------------------ (g) timing


class SlowCallback(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_step_end(self, context):
        time.sleep(self.seconds)


class HalfTheTime(Callback):
    """Sleeps as long as the step itself took: about half of each step's time, however loaded the machine."""

    def on_train_step_start(self, context):
        self.started = time.perf_counter()

    def on_train_step_end(self, context):
        time.sleep(max(time.perf_counter() - self.started, 0.005))


class QuickCallback(Callback):
    def on_train_step_start(self, context):
        pass

    def on_eval_end(self, context):
        pass


def test_stats_count_calls_and_time_per_callback(chdir):
    manager = CallbackManager()
    manager.add([SlowCallback(0.01), QuickCallback()])
    manager.register("on_train_step_end", lambda ctx: None)
    pretrain(make_tiny_config(train__train_iters=6), forward_step, callbacks=manager)
    stats = manager.stats()
    assert set(stats) == {"on_train_step_start", "on_train_step_end", "on_eval_end"}
    slow = stats["on_train_step_end"]["SlowCallback.on_train_step_end"]
    assert slow["calls"] == 6 and slow["total_s"] >= 0.06 and slow["mean_ms"] >= 10.0
    assert math.isclose(slow["mean_ms"], 1000 * slow["total_s"] / 6)
    assert stats["on_train_step_start"]["QuickCallback.on_train_step_start"]["calls"] == 6
    assert stats["on_eval_end"]["QuickCallback.on_eval_end"]["calls"] == 1  # the post-training pass
    lambdas = [name for name in stats["on_train_step_end"] if "lambda" in name]
    assert len(lambdas) == 1 and stats["on_train_step_end"][lambdas[0]]["calls"] == 6
    assert manager.total_seconds >= slow["total_s"]


def test_untimed_waits_are_left_out_of_a_callbacks_time():
    from megatron.bridge.training.callbacks import untimed

    def waits_then_works(context):
        with untimed():
            time.sleep(0.05)  # a wait for the device, say
        time.sleep(0.01)

    manager = CallbackManager()
    manager.register("on_checkpoint_save", waits_then_works)
    manager.fire("on_checkpoint_save", _ctx(0))
    row = next(iter(manager.stats()["on_checkpoint_save"].values()))
    assert 0.01 <= row["total_s"] < 0.04


def test_log_line_shows_callback_share_and_warns_once_about_a_slow_callback(chdir, capsys):
    pretrain(make_tiny_config(train__train_iters=8, logger__log_interval=1), forward_step,
             callbacks=[HalfTheTime(), QuickCallback()])
    out = capsys.readouterr().out
    log_lines = [line for line in out.splitlines() if "iteration " in line and "consumed samples" in line]
    assert len(log_lines) == 8
    assert all("callbacks: " in line and "% of step time" in line for line in log_lines), log_lines
    warnings = [line for line in out.splitlines() if "warning" in line and "callback" in line]
    assert len(warnings) == 1, warnings
    assert "HalfTheTime.on_train_step_end" in warnings[0] and "QuickCallback" not in warnings[0]
    assert "callback_time_warning_share=0.2" in warnings[0]


def test_cheap_callbacks_and_a_high_warning_share_stay_quiet(chdir, capsys):
    pretrain(make_tiny_config(train__train_iters=8, logger__log_interval=8), forward_step, callbacks=[QuickCallback()])
    pretrain(make_tiny_config(train__train_iters=4, logger__log_interval=1, logger__callback_time_warning_share=1.0),
             forward_step, callbacks=[HalfTheTime()])
    out = capsys.readouterr().out
    log_lines = [line for line in out.splitlines() if "consumed samples" in line]
    assert len(log_lines) == 2 + 4  # the quick run logs its first and last iteration, the other every one
    assert not any("callbacks: " in line for line in log_lines[:2])  # the quick run: far below 1% of step time
    assert all("callbacks: " in line for line in log_lines[2:])
    assert "> warning" not in out


# ------------------------------------------------------------------------- (h) ready-made callbacks


def test_early_stopping_stops_after_patience_bad_validations(tmp_path, chdir, capsys):
    counter, steps = Counter(), StepsSeen()
    early = EarlyStopping(patience=2, min_delta=1e9)  # only the first validation counts as an improvement
    final = Final(early)
    pretrain(make_tiny_config(train__train_iters=20, validation__eval_interval=2, checkpoint__save=str(tmp_path)),
             forward_step, callbacks=[early, counter, steps, final])
    out = capsys.readouterr().out
    assert steps.steps == list(range(6))
    assert final.snapshot["early"]["bad_passes"] == 2 and math.isfinite(final.snapshot["early"]["best"])
    assert rank_state(tmp_path, 6)["callbacks"]["EarlyStopping"] == final.snapshot["early"]
    assert counter.seen["on_train_end"] == [6]
    assert counter.seen["on_eval_start"] == [2, 4, 6, 6] and counter.seen["on_test_start"] == [6]
    assert checkpoint_io.list_iterations(tmp_path) == [6]
    assert "stopping after iteration 6" in out and "has not improved" in out
    with pytest.raises(ValueError):
        EarlyStopping(mode="sideways")


def test_early_stopping_on_an_unknown_metric_names_it(chdir):
    with pytest.raises(ValueError, match="no such loss"):
        pretrain(make_tiny_config(train__train_iters=2), forward_step, callbacks=[EarlyStopping("no such loss")])


def nan_at_fourth_step(state: GlobalState, data_iterator, model):
    output_tensor, loss_func = forward_step(state, data_iterator, model)
    if model.training and state.train_state.step == 3:
        output_tensor = output_tensor * float("nan")
    return output_tensor, loss_func


def test_loss_spike_guard_stops_on_a_nan_loss(tmp_path, chdir, capsys):
    steps, counter = StepsSeen(), Counter()
    cfg = make_tiny_config(train__train_iters=10, ddp__check_for_nan_in_grad=False, checkpoint__save=str(tmp_path))
    pretrain(cfg, nan_at_fourth_step, callbacks=[LossSpikeGuard(), steps, counter])
    out = capsys.readouterr().out
    assert steps.steps == [0, 1, 2, 3]
    assert counter.seen["on_train_end"] == [4]
    assert checkpoint_io.list_iterations(tmp_path) == [4]
    assert "loss is nan at iteration 4" in out


def _spike_context(step: int, loss: float, stops: list[str]) -> SimpleNamespace:
    state = SimpleNamespace(train_state=SimpleNamespace(step=step), request_stop=stops.append)
    return SimpleNamespace(state=state, loss_dict={"lm loss": torch.tensor(loss)})


def test_loss_spike_guard_on_synthetic_spikes():
    stops: list[str] = []
    guard = LossSpikeGuard(factor=3.0, window=10, patience=2)
    losses = [2.0] * 8 + [7.0, 2.0] + [7.0, 7.5]  # one spike, recovered; then two in a row
    for step, loss in enumerate(losses):
        guard.on_train_step_end(_spike_context(step, loss, stops))
        if step < len(losses) - 1:
            assert stops == [], (step, stops)
    assert len(stops) == 1 and "iteration 12" in stops[0] and "7.5" in stops[0]
    assert guard.strikes == 2
    assert list(guard.recent) == [2.0] * 9  # spikes are not averaged in

    # Too little history: no spike is judged on the first losses.
    early_guard, stops = LossSpikeGuard(window=10), []
    for step, loss in enumerate([1.0, 100.0, 1.0]):
        early_guard.on_train_step_end(_spike_context(step, loss, stops))
    assert stops == []
    restored = LossSpikeGuard(window=10)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert list(restored.recent) == list(guard.recent) and restored.strikes == guard.strikes
    with pytest.raises(ValueError):
        LossSpikeGuard(factor=1.0)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Crash(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_step_end(self, context):
        if context.state.train_state.step + 1 == self.at:
            raise RuntimeError("simulated crash")


def test_jsonl_writer_lines_and_resume(tmp_path, chdir):
    path = tmp_path / "metrics" / "run.jsonl"
    save = str(tmp_path / "ck")

    def cfg():
        return make_tiny_config(train__train_iters=8, validation__eval_interval=4, checkpoint__save=save,
                                checkpoint__load=save, checkpoint__save_interval=3)

    # The first run dies after writing iterations 1-5; its last checkpoint is at iteration 3.
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg(), forward_step, callbacks=[JSONLMetricsWriter(path), Crash(at=5)])
    first = _lines(path)
    assert [(r["event"], r["iteration"]) for r in first] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("validation", 4), ("train", 5)]
    train_lines = [r for r in first if r["event"] == "train"]
    assert all(isinstance(r["lm loss"], float) and r["lr"] > 0 and r["skipped"] is False for r in train_lines)
    assert all(isinstance(r["grad_norm"], float) for r in train_lines)

    pretrain(cfg(), forward_step, callbacks=[JSONLMetricsWriter(path)])
    records = _lines(path)
    assert [(r["event"], r["iteration"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("validation", 4), ("train", 5), ("train", 6),
        ("train", 7), ("train", 8), ("validation", 8), ("validation", 8), ("test", 8)]
    assert records[:3] == first[:3], "lines up to the checkpoint are kept as written"
    assert records[3]["time"] > first[-1]["time"], "lines past the checkpoint are written again by the resumed run"

    sparse = tmp_path / "sparse.jsonl"
    pretrain(make_tiny_config(train__train_iters=6, validation__eval_iters=0), forward_step,
             callbacks=[JSONLMetricsWriter(sparse, every=3)])
    assert [(r["event"], r["iteration"]) for r in _lines(sparse)] == [("train", 3), ("train", 6)]


def test_throughput_monitor_reports_tokens_per_second(chdir, capsys):
    manager = CallbackManager()
    manager.add(ThroughputMonitor(log_every=2))
    pretrain(make_tiny_config(train__train_iters=4), forward_step, callbacks=manager)
    stats = manager.user_state["throughput"]
    assert stats["tokens_per_s_per_device"] > 0 and stats["tflops_per_device"] > 0
    assert stats["mfu"] is None  # no known peak on a CPU
    assert capsys.readouterr().out.count("[throughput] iteration") == 2


# ------------------------------------------------------------------------------- (i) compatibility


def test_valid_events_are_unchanged():
    assert isinstance(VALID_EVENTS, frozenset)
    assert VALID_EVENTS == {
        "on_data_init_start", "on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end",
        "on_eval_start", "on_eval_step_start", "on_eval_step_end", "on_eval_end", "on_test_start",
        "on_test_step_start", "on_test_step_end", "on_test_end", "on_checkpoint_save"}


def test_context_keeps_its_documented_fields():
    state, model = GlobalState(), [torch.nn.Linear(2, 2)]
    context = CallbackContext(state=state, model=model)
    assert context.state is state and context.model is model and context.user_state == {}
    for name in ("optimizer", "scheduler", "loss_dict", "grad_norm", "skipped_iter", "total_loss_dict"):
        assert getattr(context, name) is None, name
    assert CallbackContext(state=state, model=model).user_state is not context.user_state
    # A positional construction in the documented field order still works.
    assert CallbackContext(state, model, {"a": 1}).user_state == {"a": 1}


class Upstream(Callback):
    """Written for upstream Megatron Bridge: no `every`, no state, a `name`-less class."""

    def __init__(self):
        self.events = []

    def on_train_start(self, context):
        context.user_state["count"] = 0
        self.events.append(("on_train_start", context.state.train_state.step))

    def on_train_step_end(self, context):
        context.user_state["count"] += 1
        self.events.append(("on_train_step_end", context.state.train_state.step))

    def on_train_end(self, context):
        self.events.append(("on_train_end", context.user_state["count"]))

    def on_eval_end(self, context):
        self.events.append(("on_eval_end", context.state.train_state.step))


def test_upstream_callback_behaves_as_before(tmp_path, chdir):
    callback = Upstream()
    manager = CallbackManager()
    manager.add(callback)
    assert [name for name in sorted(VALID_EVENTS) if manager.has_callbacks(name)] == [
        "on_eval_end", "on_train_end", "on_train_start", "on_train_step_end"]
    pretrain(make_tiny_config(train__train_iters=4, validation__eval_interval=2, checkpoint__save=str(tmp_path)),
             forward_step, callbacks=manager)
    assert callback.events == [("on_train_start", 0), ("on_train_step_end", 0), ("on_train_step_end", 1),
                               ("on_eval_end", 2), ("on_train_step_end", 2), ("on_train_step_end", 3),
                               ("on_eval_end", 4), ("on_train_end", 4), ("on_eval_end", 4)]
    saved = rank_state(tmp_path, 4)
    assert saved["callbacks"] == {} and saved["user_state"] == {"count": 4}


GUIDE = Path(__file__).resolve().parents[2] / "docs" / "callbacks.md"


def test_guide_loss_reporter_example_still_reports_its_end(chdir):
    """The guide's first example keeps its own `self.every` setting; its on_train_start/on_train_end must still run.

    Its `every` attribute was written before `every` filters existed (a callback written for upstream
    may have one too), so it must not silently turn into a filter that skips one-shot events.
    """
    text = GUIDE.read_text()
    start = text.index("```python", text.index("### As a class")) + len("```python")
    source = text[start:text.index("```", start)]
    source = source.replace("config.train.train_iters = 10", "config.train.train_iters = 10\n"
                            "config.model.num_layers = 1\nconfig.model.seq_length = config.dataset.seq_length = 32\n"
                            "config.train.global_batch_size = 4\nconfig.train.micro_batch_size = 2\n"
                            "config.scheduler.lr_warmup_iters = 1\nconfig.logger.tensorboard_dir = None\n"
                            "config.validation.eval_iters = 1")
    assert "LossReporter(every=5)" in source
    namespace: dict[str, Any] = {"__name__": "guide_example"}
    printed: list[str] = []
    namespace["print"] = lambda *args, **kwargs: printed.append(" ".join(str(a) for a in args))
    exec(compile(source, str(GUIDE), "exec"), namespace)
    reporter_lines = [line for line in printed if line.startswith("[LossReporter]")]
    assert [line.split(":")[0] for line in reporter_lines[:2]] == ["[LossReporter] step 5", "[LossReporter] step 10"]
    assert any(line.startswith("[LossReporter] 10 steps in") for line in reporter_lines), reporter_lines
