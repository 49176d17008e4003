"""Nothing lost on a hard kill, and graceful stops: signals, exit_interval, exit_duration_in_mins.

The hard-kill and SIGTERM tests run training in a subprocess (a script written to `tmp_path`) and
kill it from outside; the other early stops run `pretrain` in-process.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from helpers import make_tiny_config
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


def tiny_config(overrides: dict[str, Any]) -> ConfigContainer:
    """The shared tiny test config (`tests/helpers.py`); `overrides` maps `train__train_iters`-style paths."""
    return make_tiny_config(**overrides)


# The training script: the shared factory, plus a callback that reports events as JSON lines.
SCRIPT = (
    "import json, sys\n"
    "from typing import Any\n"
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "from megatron.bridge.training.callbacks import Callback\n"
    "from megatron.bridge.training.config import ConfigContainer\n"
    "from megatron.bridge.training.gpt_step import forward_step\n"
    "from megatron.bridge.training.pretrain import pretrain\n"
    f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
    "from helpers import make_tiny_config\n\n"
    + inspect.getsource(tiny_config)
    + '''

def emit(**record):
    print("EVENT " + json.dumps(record), flush=True)


class Reporter(Callback):
    def on_train_start(self, context):
        emit(event="start", step=context.state.train_state.step)

    def on_train_step_end(self, context):
        emit(event="step", step=context.state.train_state.step + 1, loss=context.loss_dict["lm loss"].item())

    def on_checkpoint_save(self, context):
        emit(event="checkpoint", step=context.state.train_state.step)

    def on_train_end(self, context):
        emit(event="train_end", step=context.state.train_state.step)

    def on_eval_start(self, context):
        emit(event="eval_start", step=context.state.train_state.step)

    def on_test_start(self, context):
        emit(event="test_start", step=context.state.train_state.step)


pretrain(tiny_config(json.loads(sys.argv[1])), forward_step, [Reporter()])
emit(event="returned")
'''
)


class Trainer:
    """A training subprocess whose reported events are read as they come."""

    def __init__(self, tmp_path: Path, overrides: dict[str, Any]) -> None:
        script = tmp_path / "train_script.py"
        if not script.exists():
            script.write_text(SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.launched_ns = time.time_ns()
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(overrides)], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("EVENT "):
                self._queue.put(json.loads(line[len("EVENT "):]))
        self._queue.put(None)

    def next_event(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """The next reported event; None once the process has closed its output."""
        try:
            record = self._queue.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("training subprocess reported nothing for a minute:\n" + self.log()) from None
        if record is not None:
            self.events.append(record)
        return record

    def wait_for(self, predicate, timeout: float = 60.0) -> dict[str, Any]:
        while True:
            record = self.next_event(timeout)
            assert record is not None, "training subprocess ended early:\n" + self.log()
            if predicate(record):
                return record

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit on its own; its exit status."""
        while self.next_event(timeout) is not None:
            pass
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL, "the process had already ended:\n" + self.log()
        self._reader.join(timeout=30)
        while self.next_event(timeout=1) is not None:
            pass

    def log(self) -> str:
        return "".join(self.output[-60:])

    def of(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.events if record["event"] == event]


def fresh_temporaries(save: Path, since_ns: int) -> list[str]:
    """`.tmp_iter_*` directories created after `since_ns` (older ones are leftovers of earlier kills)."""
    found = []
    try:
        with os.scandir(save) as entries:
            for entry in entries:
                if entry.name.startswith(".tmp_iter_"):
                    try:
                        if entry.stat().st_ctime_ns >= since_ns:
                            found.append(entry.name)
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    return found


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read every file of a checkpoint through the safe readers: (common.json, all tensors)."""
    common = checkpoint_io.read_json(directory / checkpoint_io.COMMON_FILE)
    assert isinstance(yaml.safe_load((directory / checkpoint_io.CONFIG_FILE).read_text()), dict)
    rank_files = sorted(directory.glob("*rank_00000.json"))
    assert len(rank_files) == 1 and checkpoint_io.read_json(rank_files[0])
    index = checkpoint_io.read_index(directory)
    tensors = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in index.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    checkpoint_io.load_tensors(tensors, directory)
    return common, tensors


def assert_all_checkpoints_loadable(save: Path) -> list[int]:
    steps = checkpoint_io.list_iterations(save)
    for step in steps:
        common, tensors = read_checkpoint(checkpoint_io.iteration_dir(save, step))
        assert common["train_state"]["step"] == step
        assert any(key.startswith("model.") for key in tensors)
        assert any(key.startswith("optimizer.") for key in tensors)
    tracker = save / checkpoint_io.TRACKER_FILE
    if steps:
        tracked = int(tracker.read_text())
        assert tracked in steps, f"the tracker points at {tracked}, which is not on disk ({steps})"
    return steps


# ------------------------------------------------------------------------------------------ hard kill

HARD_KILL = dict(train__train_iters=40, checkpoint__save_interval=2, checkpoint__most_recent_k=3,
                 scheduler__lr_warmup_iters=4, scheduler__lr_decay_style="cosine")


def test_sigkill_at_any_moment_loses_nothing_and_resume_is_exact(tmp_path):
    # The uninterrupted reference, in-process.
    reference_dir = tmp_path / "reference"
    losses: dict[int, float] = {}

    class Losses(Callback):
        def on_train_step_end(self, context):
            losses[context.state.train_state.step + 1] = context.loss_dict["lm loss"].item()

    pretrain(tiny_config({**HARD_KILL, "checkpoint__save": str(reference_dir)}), forward_step, [Losses()])
    assert sorted(losses) == list(range(1, 41))

    save = tmp_path / "ckpt"
    overrides = {**HARD_KILL, "checkpoint__save": str(save)}
    rng = random.Random(20240607)
    seen: dict[int, list[float]] = {}
    landed_in_save = 0
    # Kills at a random moment after a random number of steps, kills right after an odd step (no save
    # follows it: inside the next training step), and kills timed to land inside a save: the moment a
    # new temporary checkpoint directory appears.
    plan = ["random", "save", "train", "save", "random"]
    for kind in plan:
        before = checkpoint_io.list_iterations(save)
        trainer = Trainer(tmp_path, overrides)
        start = trainer.wait_for(lambda r: r["event"] == "start")["step"]
        assert start == (before[-1] if before else 0), trainer.log()
        if kind == "random":
            target = start + rng.randint(1, 5)
            trainer.wait_for(lambda r, target=target: r["event"] == "step" and r["step"] >= target)
            time.sleep(rng.uniform(0.0, 0.05))
        elif kind == "train":
            target = start + rng.randint(1, 3)
            trainer.wait_for(lambda r, target=target: r["event"] == "step" and r["step"] >= target and r["step"] % 2)
        else:
            trainer.wait_for(lambda r: r["event"] == "step")
            deadline = time.monotonic() + 30
            while not fresh_temporaries(save, trainer.launched_ns):
                assert time.monotonic() < deadline, "no save started:\n" + trainer.log()
                assert trainer.proc.poll() is None, "the process ended:\n" + trainer.log()
        trainer.kill()
        if kind == "save" and fresh_temporaries(save, trainer.launched_ns):
            landed_in_save += 1
        for record in trainer.of("step"):
            seen.setdefault(record["step"], []).append(record["loss"])
        assert trainer.of("train_end") == []
        after = assert_all_checkpoints_loadable(save)
        # Older checkpoints go only once a newer one is complete: the newest is never lost.
        assert not before or (after and after[-1] >= before[-1])
        assert len(after) <= 3
    assert landed_in_save >= 1, "no kill landed inside a save"

    # Resume to the end.
    before = checkpoint_io.list_iterations(save)
    assert before[-1] < 40
    trainer = Trainer(tmp_path, overrides)
    assert trainer.finish() == 0, trainer.log()
    assert trainer.of("start")[0]["step"] == before[-1]
    assert len(trainer.of("train_end")) == 1
    assert trainer.of("returned")
    for record in trainer.of("step"):
        seen.setdefault(record["step"], []).append(record["loss"])

    # Every loss any process reported is the uninterrupted run's, bit for bit.
    assert set(seen) == set(range(1, 41))
    for step, values in sorted(seen.items()):
        assert all(value == losses[step] for value in values), (step, values, losses[step])

    # Nothing lost: the newest checkpoints are there, nothing half-written is left, and the last one
    # (model, optimizer, counters) is identical to the uninterrupted run's.
    assert assert_all_checkpoints_loadable(save) == [36, 38, 40]
    assert (save / checkpoint_io.TRACKER_FILE).read_text().strip() == "40"
    assert [p.name for p in save.iterdir() if p.name.startswith(".")] == []
    common, tensors = read_checkpoint(save / "iter_0000040")
    reference_common, reference_tensors = read_checkpoint(reference_dir / "iter_0000040")
    assert common["train_state"] == reference_common["train_state"]
    assert common["scheduler"] == reference_common["scheduler"]
    assert tensors.keys() == reference_tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(value, reference_tensors[key]), key


# ------------------------------------------------------------------------------------ graceful stops


def test_sigterm_in_a_subprocess_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    trainer = Trainer(tmp_path, dict(train__train_iters=100000, train__exit_signal_handler=True,
                                     checkpoint__save=str(save), checkpoint__save_interval=1000,
                                     validation__eval_iters=1))
    trainer.wait_for(lambda r: r["event"] == "step" and r["step"] >= 3)
    trainer.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert trainer.finish(timeout=30) == 0, trainer.log()
    assert time.monotonic() - signalled < 15
    last = trainer.of("step")[-1]["step"]
    assert 3 <= last < 100000
    assert [r["step"] for r in trainer.of("checkpoint")] == [last]
    assert checkpoint_io.list_iterations(save) == [last]
    assert (save / checkpoint_io.TRACKER_FILE).read_text().strip() == str(last)
    assert trainer.of("train_end") == []
    assert trainer.of("eval_start") == [] and trainer.of("test_start") == []
    assert trainer.of("returned")
    assert "SIGTERM" in "".join(trainer.output)


class Recorder(Callback):
    def __init__(self, send: signal.Signals | None = None, at_step: int = 2) -> None:
        self.events: list[tuple[str, int]] = []
        self.send, self.at_step = send, at_step

    def _record(self, name: str, context) -> None:
        self.events.append((name, context.state.train_state.step))

    def on_train_step_end(self, context):
        self._record("on_train_step_end", context)
        if self.send is not None and context.state.train_state.step + 1 == self.at_step:
            os.kill(os.getpid(), self.send)

    def on_checkpoint_save(self, context):
        self._record("on_checkpoint_save", context)

    def on_train_end(self, context):
        self._record("on_train_end", context)

    def on_eval_start(self, context):
        self._record("on_eval_start", context)

    def on_test_start(self, context):
        self._record("on_test_start", context)

    def steps(self) -> list[int]:
        return [step + 1 for name, step in self.events if name == "on_train_step_end"]

    def saved(self) -> list[int]:
        return [step for name, step in self.events if name == "on_checkpoint_save"]

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def assert_stopped_early(recorder: Recorder, save: Path | None, stop: int) -> None:
    assert recorder.steps() == list(range(1, stop + 1))
    assert "on_train_end" not in recorder.names()
    assert "on_eval_start" not in recorder.names()  # post-training validation skipped
    assert "on_test_start" not in recorder.names()  # and the test pass
    if save is not None:
        assert recorder.saved() == [stop]
        assert checkpoint_io.list_iterations(save) == [stop]
        assert (save / checkpoint_io.TRACKER_FILE).read_text().strip() == str(stop)
        common, _ = read_checkpoint(save / f"iter_{stop:07d}")
        assert common["train_state"]["step"] == stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_returns(tmp_path, capsys, sig):
    received: list[int] = []

    def guard(signum, frame):  # in place of the default handler, in case pretrain installs none
        received.append(signum)

    previous = signal.signal(sig, guard)
    try:
        save = tmp_path / "ckpt"
        recorder = Recorder(send=sig, at_step=2)
        pretrain(tiny_config(dict(train__train_iters=8, train__exit_signal_handler=True,
                                  checkpoint__save=str(save))), forward_step, [recorder])
        assert received == [], "pretrain did not handle the signal"
        assert signal.getsignal(sig) is guard, "pretrain did not restore the previous handler"
    finally:
        signal.signal(sig, previous)
    assert_stopped_early(recorder, save, 2)
    assert sig.name in capsys.readouterr().out


def test_without_exit_signal_handler_pretrain_leaves_signals_alone(tmp_path):
    received: list[int] = []

    def guard(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        recorder = Recorder(send=signal.SIGTERM, at_step=2)
        pretrain(tiny_config(dict(train__train_iters=4)), forward_step, [recorder])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]
    assert recorder.steps() == [1, 2, 3, 4]
    assert "on_train_end" in recorder.names()


class SignalInPass(Recorder):
    """Records events and sends `sig` to its own process when the post-training `pass_name` pass starts.

    `pass_name="checkpoint"`: when the final checkpoint (after the loop, before the passes) is saved.
    """

    def __init__(self, sig: signal.Signals, pass_name: str) -> None:
        super().__init__()
        self.sig, self.pass_name = sig, pass_name

    def on_eval_start(self, context):
        super().on_eval_start(context)
        if self.pass_name == "eval":
            os.kill(os.getpid(), self.sig)

    def on_test_start(self, context):
        super().on_test_start(context)
        if self.pass_name == "test":
            os.kill(os.getpid(), self.sig)

    def on_checkpoint_save(self, context):
        super().on_checkpoint_save(context)
        if self.pass_name == "checkpoint":
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize(("pass_name", "skip_train"),
                         [("eval", False), ("test", False), ("eval", True), ("checkpoint", False)],
                         ids=["validation", "test", "skip_train-validation", "final-save"])
def test_a_signal_during_the_post_training_passes_ends_them_cleanly(tmp_path, capsys, pass_name, skip_train):
    received: list[int] = []

    def guard(signum, frame):  # in place of the default handler, in case pretrain installs none
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        save = tmp_path / "ckpt"
        recorder = SignalInPass(signal.SIGTERM, pass_name)
        pretrain(tiny_config(dict(train__train_iters=3, train__exit_signal_handler=True, validation__eval_iters=2,
                                  validation__skip_train=skip_train, checkpoint__save=str(save))),
                 forward_step, [recorder])
        assert received == [], "pretrain did not handle the signal"
        assert signal.getsignal(signal.SIGTERM) is guard, "pretrain did not restore the previous handler"
    finally:
        signal.signal(signal.SIGTERM, previous)
    names = recorder.names()
    # The pass under way finishes and the rest is skipped.
    assert names.count("on_eval_start") == (0 if pass_name == "checkpoint" else 1)
    assert names.count("on_test_start") == (1 if pass_name == "test" else 0)
    if not skip_train:
        assert "on_train_end" in names and recorder.saved() == [3]
        assert checkpoint_io.list_iterations(save) == [3]
    out = capsys.readouterr().out
    assert ("received SIGTERM: skipping the post-training test pass" in out) is (pass_name == "eval")
    assert ("received SIGTERM: skipping the post-training validation and test passes" in out) is (
        pass_name == "checkpoint")


SIGNAL_IN_VALIDATION_SCRIPT = f"""
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from helpers import make_tiny_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


class SignalInValidation(Callback):
    def on_eval_start(self, context):
        os.kill(os.getpid(), signal.SIGTERM)


cfg = make_tiny_config(train__train_iters=2, train__exit_signal_handler=True, checkpoint__save="ckpt")
pretrain(cfg, forward_step, [SignalInValidation()])
print("RETURNED", flush=True)
"""


def test_sigterm_during_the_final_validation_exits_with_status_0(tmp_path):
    script = tmp_path / "signal_in_validation.py"
    script.write_text(SIGNAL_IN_VALIDATION_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RETURNED" in done.stdout
    assert checkpoint_io.list_iterations(tmp_path / "ckpt") == [2]


SIGNAL_ON_ONE_RANK_SCRIPT = f"""
import os, signal, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from helpers import make_tiny_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


class SignalRankOneInValidation(Callback):
    def __init__(self):
        self.tested = False

    def on_eval_start(self, context):
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_test_start(self, context):
        self.tested = True


callback = SignalRankOneInValidation()
cfg = make_tiny_config(train__train_iters=2, train__exit_signal_handler=True, checkpoint__save="ckpt")
pretrain(cfg, forward_step, [callback])
print(f"RETURNED rank={{os.environ['RANK']}} tested={{callback.tested}}", flush=True)
"""


def test_sigterm_on_one_rank_during_validation_skips_the_test_pass_on_every_rank(tmp_path):
    script = tmp_path / "signal_on_one_rank.py"
    script.write_text(SIGNAL_ON_ONE_RANK_SCRIPT)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(script)], cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RETURNED rank=0 tested=False" in done.stdout and "RETURNED rank=1 tested=False" in done.stdout
    assert "another rank received a signal: skipping the post-training test pass" in done.stdout
    assert checkpoint_io.list_iterations(tmp_path / "ckpt") == [2]


# Ctrl-C with exit_signal_handler, through the real command line. The signals are real (`os.kill` of
# the process itself); their moment is chosen from inside the run, so that there are no sleeps or races.
# Run as `python script.py MODE ARGS...`: the command line's main() with the forward step below.
CTRL_C_SCRIPT = '''
import os, signal, sys
import torch
torch.set_num_threads(1)
from megatron.bridge import cli
from megatron.bridge.checkpoint import io
from megatron.bridge.training.gpt_step import forward_step

mode, argv = sys.argv[1], sys.argv[2:]
calls = {"eval": 0, "save": 0}


def forward_step_signalling_in_validation(state, data_iterator, model):
    # Two micro-batches per step: the 5th call in evaluation is the first of validation step 3.
    if not model.training:
        calls["eval"] += 1
        if mode == "once" and calls["eval"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
    return forward_step(state, data_iterator, model)


real_save_tensors = io.save_tensors


def save_tensors_interrupted_twice(*args, **kwargs):
    # The second checkpoint's tensors are being written when Ctrl-C is pressed twice.
    calls["save"] += 1
    if mode == "twice" and calls["save"] == 2:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    return real_save_tensors(*args, **kwargs)


io.save_tensors = save_tensors_interrupted_twice
cli.main([*argv, "--forward-step", "__main__:forward_step_signalling_in_validation"])
print("RETURNED", flush=True)
'''

CTRL_C_RUN = ["--recipe", "qwen25_tiny", "train.global_batch_size=4", "train.micro_batch_size=2", "model.num_layers=1",
       "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_query_groups=2",
       "model.seq_length=32", "dataset.seq_length=32", "tokenizer.vocab_size=128", "scheduler.lr_warmup_iters=0",
       "logger.tensorboard_dir=null", "logger.log_interval=1", "train.exit_signal_handler=true",
       "checkpoint.save=ckpt", "checkpoint.load=ckpt"]


def run_ctrl_c_script(tmp_path: Path, mode: str, *overrides: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(script), mode, *CTRL_C_RUN, *overrides], cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)


def test_ctrl_c_once_stops_a_long_validation_pass_within_one_step_saves_and_exits_0(tmp_path):
    done = run_ctrl_c_script(tmp_path, "once", "train.train_iters=6", "validation.eval_interval=2",
                      "validation.eval_iters=200", "checkpoint.save_interval=100")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "RETURNED" in out
    # Acknowledged at once, inside validation step 3 of 200; the pass stops before step 4.
    ack = ("> received SIGINT: stopping the validation pass after this step, then saving and stopping; "
           "press Ctrl-C again to stop now")
    assert ack in out
    assert "> received SIGINT: validation pass stopped after 3 of validation.eval_iters=200 steps" in out
    assert out.index(ack) < out.index("validation pass stopped after 3")
    assert "validation loss at iteration" not in out  # a pass cut short reports nothing
    # The run then saves the step it is at and stops: no more training, no post-training passes.
    assert checkpoint_io.list_iterations(tmp_path / "ckpt") == [2]
    assert "> stopping after iteration 2: received SIGINT" in out
    assert "test loss" not in out
    assert done.stderr.count("Traceback") == 0


def test_ctrl_c_twice_during_a_save_stops_at_once_with_130_and_keeps_the_previous_checkpoint(tmp_path):
    done = run_ctrl_c_script(tmp_path, "twice", "train.train_iters=8", "checkpoint.save_interval=2",
                      "validation.eval_iters=0")
    assert done.returncode == 130, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr == "python -m megatron.bridge.pretrain: interrupted\n"
    out = done.stdout
    assert "> received SIGINT: " in out and "> received SIGINT again: stopping now" in out
    assert "RETURNED" not in out
    save = tmp_path / "ckpt"
    # The checkpoint of iteration 4 was being written: nothing of it is an iter_* folder, and the
    # tracker still names iteration 2, whose checkpoint is complete and loads.
    assert checkpoint_io.temporary_dir(save, 4).is_dir()
    assert assert_all_checkpoints_loadable(save) == [2]
    assert (save / checkpoint_io.TRACKER_FILE).read_text().strip() == "2"


def test_exit_duration_in_mins_stops_after_the_first_step(tmp_path, capsys):
    save = tmp_path / "ckpt"
    recorder = Recorder()
    pretrain(tiny_config(dict(train__train_iters=8, train__exit_duration_in_mins=0.0001,
                              validation__eval_interval=4, checkpoint__save=str(save))), forward_step, [recorder])
    assert_stopped_early(recorder, save, 1)
    assert "exit_duration_in_mins" in capsys.readouterr().out


@pytest.mark.parametrize(("save_interval", "async_save"), [(None, False), (3, False), (None, True), (2, True)],
                         ids=["final-save", "already-saved", "async", "async-interval"])
def test_exit_interval_stops_saves_once_and_returns(tmp_path, capsys, save_interval, async_save):
    save = tmp_path / "ckpt"
    recorder = Recorder()
    pretrain(tiny_config(dict(train__train_iters=8, train__exit_interval=3, checkpoint__save=str(save),
                              checkpoint__save_interval=save_interval, checkpoint__async_save=async_save)),
             forward_step, [recorder])
    assert recorder.steps() == [1, 2, 3]
    assert "on_train_end" not in recorder.names()
    assert "on_eval_start" not in recorder.names() and "on_test_start" not in recorder.names()
    expected = [2, 3] if save_interval == 2 else [3]
    assert checkpoint_io.list_iterations(save) == expected
    assert len(recorder.saved()) == len(expected)
    assert "exit_interval" in capsys.readouterr().out


def test_exit_interval_without_checkpointing_returns_without_on_train_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder()
    pretrain(tiny_config(dict(train__train_iters=8, train__exit_interval=2)), forward_step, [recorder])
    assert_stopped_early(recorder, None, 2)
    assert list(tmp_path.iterdir()) == []
