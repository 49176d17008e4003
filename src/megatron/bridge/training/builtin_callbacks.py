"""Ready-made, opt-in callbacks: early stopping, a throughput monitor, a loss guard, a JSONL writer.

Each one uses only the public callback API (plus `state.request_stop`), so it doubles as an
example. None of them is ever added by the framework itself.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from megatron.bridge.training.callbacks import Callback, CallbackContext, untimed
from megatron.bridge.training.metrics import model_flops_per_token, peak_tflops
from megatron.bridge.utils.parallel import current_layout

__all__ = ["EarlyStopping", "JSONLMetricsWriter", "LossSpikeGuard", "ThroughputMonitor"]


def _rank() -> int:
    return current_layout().rank


class EarlyStopping(Callback):
    """Stop training when a validation loss has not improved for `patience` validation passes.

    The stop goes through `state.request_stop`, so every rank stops at the same step, a
    checkpoint is saved and `on_train_end` fires. The counters are saved in every checkpoint and
    restored on resume.
    """

    def __init__(self, monitor: str = "lm loss", *, patience: int = 3, min_delta: float = 0.0,
                 mode: str = "min", name: str | None = None) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is invalid: choose min or max")
        if patience < 1:
            raise ValueError(f"patience={patience!r} is invalid: a positive integer")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.name = name
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_passes = 0

    def on_eval_end(self, context: CallbackContext) -> None:
        if self.monitor not in context.total_loss_dict:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, not among {sorted(context.total_loss_dict)}")
        with untimed():  # waits for the GPU: not this callback's own time
            value = float(context.total_loss_dict[self.monitor])
        improved = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if improved:
            self.best, self.bad_passes = value, 0
            return
        self.bad_passes += 1
        if self.bad_passes >= self.patience:
            context.state.request_stop(
                f"{self.monitor} has not improved on {self.best:.6g} by more than {self.min_delta} "
                f"for {self.bad_passes} validation passes"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_passes": self.bad_passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_passes = float(state["best"]), int(state["bad_passes"])


class ThroughputMonitor(Callback):
    """Tokens/s, model TFLOP/s and MFU per device, every `log_every` steps.

    Prints on rank 0, writes TensorBoard scalars when a writer exists, and keeps the latest values
    in `context.user_state["throughput"]`. MFU needs the device's peak: known for H100/H200/A100,
    or pass `peak_tflops`. On a GPU it waits for the device once per window, for the time, and
    reads nothing in between.
    """

    def __init__(self, log_every: int = 10, *, peak_tflops: float | None = None) -> None:
        self.log_every, self.peak = log_every, peak_tflops
        self._flops_per_token: float | None = None
        self._window_start: float | None = None
        self._steps = 0

    def on_train_start(self, context: CallbackContext) -> None:
        cfg, model = context.state.cfg, context.model[0]
        inner = getattr(model, "module", model)
        self._flops_per_token = model_flops_per_token(
            inner, num_layers=cfg.model.num_layers, seq_length=cfg.model.seq_length,
            attention_width=cfg.model.num_attention_heads * cfg.model.resolved_kv_channels,
        )
        self._device = next(inner.parameters()).device
        if self.peak is None:
            self.peak = peak_tflops(self._device)
        self._window_start, self._steps = time.perf_counter(), 0

    def on_train_step_end(self, context: CallbackContext) -> None:
        self._steps += 1
        if self._steps % self.log_every:
            return
        if self._device.type == "cuda":
            # The host runs ahead of the GPU; wait for the window's work so the time is the GPU's.
            with untimed():
                torch.cuda.synchronize(self._device)
        cfg = context.state.cfg
        elapsed = time.perf_counter() - self._window_start
        world = current_layout().world_size
        tokens_per_s = self._steps * cfg.train.global_batch_size * cfg.model.seq_length / elapsed / world
        tflops = tokens_per_s * self._flops_per_token / 1e12
        stats = {"tokens_per_s_per_device": tokens_per_s, "tflops_per_device": tflops,
                 "mfu": tflops / self.peak if self.peak else None}
        context.user_state["throughput"] = stats
        step = context.state.train_state.step + 1
        if _rank() == 0:
            mfu = f", MFU {100 * stats['mfu']:.1f}%" if stats["mfu"] is not None else ""
            print(f"[throughput] iteration {step}: {tokens_per_s:,.0f} tokens/s/device, {tflops:.2f} TFLOP/s{mfu}",
                  flush=True)
        writer = context.state.tensorboard_logger
        if writer is not None:
            for key, value in stats.items():
                if value is not None:
                    writer.add_scalar(f"throughput/{key}", value, step)
        self._window_start, self._steps = time.perf_counter(), 0


class LossSpikeGuard(Callback):
    """Stop training (with a checkpoint) when the loss is not finite or jumps above its recent mean.

    A spike is a loss above `factor` times the mean of the last `window` losses; `patience`
    consecutive spikes (or one non-finite loss) stop the run. Reading the loss costs one host
    sync per step on a GPU. The recent losses are saved with each checkpoint.
    """

    def __init__(self, *, factor: float = 3.0, window: int = 20, patience: int = 1, name: str | None = None) -> None:
        if factor <= 1.0 or window < 1 or patience < 1:
            raise ValueError(f"LossSpikeGuard(factor={factor}, window={window}, patience={patience}) is invalid: "
                             "factor > 1, window >= 1, patience >= 1")
        self.factor, self.window, self.patience, self.name = factor, window, patience, name
        self.recent: deque[float] = deque(maxlen=window)
        self.strikes = 0

    def on_train_step_end(self, context: CallbackContext) -> None:
        with untimed():  # waits for the GPU: not this callback's own time
            loss = float(context.loss_dict["lm loss"])
        step = context.state.train_state.step + 1
        if not math.isfinite(loss):
            context.state.request_stop(f"loss is {loss} at iteration {step}")
            return
        mean = sum(self.recent) / len(self.recent) if self.recent else None
        if mean is not None and len(self.recent) >= max(2, self.window // 2) and loss > self.factor * mean:
            self.strikes += 1
            if self.strikes >= self.patience:
                context.state.request_stop(f"loss {loss:.4g} at iteration {step} is above {self.factor} x the "
                                           f"recent mean {mean:.4g} for {self.strikes} step(s)")
            return
        self.strikes = 0
        self.recent.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "strikes": self.strikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(x) for x in state["recent"]), maxlen=self.window)
        self.strikes = int(state["strikes"])


class JSONLMetricsWriter(Callback):
    """Appends one JSON object per line: each training step, validation pass and test pass.

    Lines carry `event` (train, validation, test) and `iteration` (as in the log line). On
    rank 0 only unless `all_ranks=True` (then `path` gets a `.rank<N>` suffix). `every=N` writes
    every N-th step. On resume, training lines past the resumed iteration (written after the last
    checkpoint by the interrupted run) are dropped first, so the file reads as one clean run.
    """

    def __init__(self, path: str | os.PathLike, *, every: int = 1, all_ranks: bool = False) -> None:
        self.base_path, self.all_ranks = Path(path), all_ranks
        self.fire_every = {"on_train_step_end": every}
        self._file: Any = None

    def _active(self) -> bool:
        return self.all_ranks or _rank() == 0

    def on_train_start(self, context: CallbackContext) -> None:
        if self._active():
            self._open(resume_step=context.state.train_state.step)

    def _open(self, *, resume_step: int) -> None:
        path = self.base_path
        if self.all_ranks:
            path = path.with_name(f"{path.name}.rank{_rank()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            if not self._active():
                return
            self._open(resume_step=10**12)
        self._file.write(json.dumps(record) + "\n")

    def on_train_step_end(self, context: CallbackContext) -> None:
        record = {"event": "train", "iteration": context.state.train_state.step + 1, "time": time.time(),
                  "lr": context.scheduler.get_lr() if context.scheduler is not None else None,
                  "grad_norm": context.grad_norm, "skipped": context.skipped_iter}
        with untimed():  # waits for the GPU: not this callback's own time
            record.update({name: float(value) for name, value in context.loss_dict.items()})
        self._write(record)

    def on_eval_end(self, context: CallbackContext) -> None:
        self._write_pass("validation", context)

    def on_test_end(self, context: CallbackContext) -> None:
        self._write_pass("test", context)
        if self._file is not None:
            self._file.flush()

    def _write_pass(self, event: str, context: CallbackContext) -> None:
        record = {"event": event, "iteration": context.state.train_state.step, "time": time.time()}
        with untimed():  # waits for the GPU: not this callback's own time
            record.update({name: float(value) for name, value in context.total_loss_dict.items()})
        self._write(record)
