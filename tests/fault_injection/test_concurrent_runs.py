"""Two runs on one save folder: the second is refused naming the first; a dead run's lock never blocks.

Real processes: the holder trains in a subprocess (or under torchrun), the second run is `pretrain` in
this process or a torchrun job. The lock is an OS lock, so a SIGKILLed holder leaves a lock file
that the next run simply takes over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from checkpoint_faults import Stateful

from helpers import make_tiny_config
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.checkpoint.lock import LOCK_FILE, SaveFolderInUseError, SaveFolderLock
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

RUNNER = f"""
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from helpers import make_tiny_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


class Reporter(Callback):
    def on_train_start(self, context):
        print("EVENT " + json.dumps({{"event": "start", "step": context.state.train_state.step}}), flush=True)

    def on_train_step_end(self, context):
        print("EVENT " + json.dumps({{"event": "step", "step": context.state.train_state.step + 1}}), flush=True)

    def on_checkpoint_save(self, context):
        print("EVENT " + json.dumps({{"event": "checkpoint", "step": context.state.train_state.step}}), flush=True)


pretrain(make_tiny_config(**json.loads(sys.argv[1])), forward_step, [Reporter()])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


class Holder:
    """A training subprocess saving into `save`; its EVENT lines are read as they come."""

    def __init__(self, tmp_path: Path, save: Path) -> None:
        script = tmp_path / "runner.py"
        script.write_text(RUNNER)
        overrides = dict(train__train_iters=100000, checkpoint__save=str(save), checkpoint__save_interval=2)
        self.proc = subprocess.Popen([sys.executable, str(script), json.dumps(overrides)], env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("EVENT "):
                self.events.put(json.loads(line[len("EVENT "):]))

    def wait_for(self, event: str, *, at_least: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                record = self.events.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "the holder ended:\n" + "".join(self.output[-50:])
                continue
            if record["event"] == event and record["step"] >= at_least:
                return record
        raise AssertionError(f"no {event} event:\n" + "".join(self.output[-50:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def test_a_held_folder_refuses_a_second_run_until_its_holder_dies(tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    holder = Holder(tmp_path, save)
    try:
        holder.wait_for("checkpoint", at_least=2)
        reads: list[Path] = []
        monkeypatch.setattr(checkpoint_io, "load_tensors", lambda *a, **k: reads.append(a[1]))
        second = Stateful()
        with pytest.raises(SaveFolderInUseError) as caught:
            pretrain(make_tiny_config(train__train_iters=4, checkpoint__save=str(save)), forward_step, [second])
        message = str(caught.value)
        assert f"checkpoint.save={str(save)!r}" in message
        assert f"pid {holder.proc.pid} on host {socket.gethostname()}, started 20" in message
        assert reads == [] and not second.started, "the refused run loaded or trained"
        # The holder goes on saving, untouched by the refused run.
        done = holder.wait_for("checkpoint", at_least=holder.wait_for("step")["step"] + 2)
        monkeypatch.undo()
    finally:
        holder.kill()
    # SIGKILL: the lock file stays behind, naming a process that no longer exists...
    stale = json.loads((save / LOCK_FILE).read_text())
    assert stale["pid"] == holder.proc.pid
    # ... and blocks nothing: the next run takes the folder and resumes from the newest checkpoint.
    newest = checkpoint_io.list_iterations(save)[-1]
    assert newest >= done["step"]
    resumed = Stateful()
    pretrain(make_tiny_config(train__train_iters=newest + 1, checkpoint__save=str(save)), forward_step, [resumed])
    assert resumed.started and checkpoint_io.list_iterations(save)[-1] == newest + 1
    assert not (save / LOCK_FILE).exists(), "the lock file outlived the run that held it"


def test_under_torchrun_every_rank_refuses_before_touching_the_folder(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    leftover = save / ".tmp_iter_0000099"  # a save in progress of the holder: the cleanup must not run
    leftover.mkdir()
    (leftover / "half-written").write_text("x")
    lock = SaveFolderLock(save)
    lock.acquire()
    try:
        script = tmp_path / "runner.py"
        script.write_text(RUNNER)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(port), str(script),
                   json.dumps(dict(train__train_iters=4, checkpoint__save=str(save)))]
        job = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    output = job.stdout + job.stderr
    assert job.returncode != 0, output
    assert "EVENT" not in output, "a rank started training"
    # Every rank learned the outcome from rank 0 and raised the same error.
    assert output.count(f"is in use by the run of pid {os.getpid()}") >= 2, output[-4000:]
    assert (leftover / "half-written").exists()
    assert sorted(p.name for p in save.iterdir()) == [".tmp_iter_0000099"]


def test_two_locks_in_one_process_exclude_each_other_and_release_cleanly(tmp_path):
    first, second = SaveFolderLock(tmp_path), SaveFolderLock(tmp_path)
    first.acquire()
    with pytest.raises(SaveFolderInUseError, match=f"pid {os.getpid()}"):
        second.acquire()
    assert not second.held
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()
    first.release()  # a second release does nothing


# Filesystems without flock (some network filesystems) cannot be made here: flock is made to fail.


@pytest.fixture
def no_flock(monkeypatch):
    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)


def _write_holder(folder: Path, **holder: Any) -> None:
    (folder / LOCK_FILE).write_text(json.dumps({"started": "2024-01-01T00:00:00+00:00", **holder}))


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, no_flock):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_holder(tmp_path, host=socket.gethostname(), pid=gone.pid)
    lock = SaveFolderLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["live-here", "other-host"])
def test_without_flock_a_holder_that_may_be_alive_is_refused_with_the_way_out(tmp_path, no_flock, where):
    host = socket.gethostname() if where == "live-here" else "elsewhere.example"
    pid = os.getppid() if where == "live-here" else 12345
    _write_holder(tmp_path, host=host, pid=pid)
    with pytest.raises(SaveFolderInUseError) as caught:
        SaveFolderLock(tmp_path).acquire()
    assert f"pid {pid} on host {host}, started 2024-01-01" in str(caught.value)
    assert f"if that run is gone, delete {tmp_path / LOCK_FILE}" in str(caught.value)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == pid

