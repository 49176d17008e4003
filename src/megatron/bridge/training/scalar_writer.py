"""TensorBoard and W&B scalars under Megatron Bridge's tags, one point per `tensorboard_log_interval`.

Every `logger.tensorboard_log_interval` steps the training step's own values are written, as
upstream does:

    learning-rate, batch-size, <loss> (e.g. "lm loss"), loss-scale (log_loss_scale_to_tensorboard),
    grad-norm (when a norm is reported), skipped-train-samples (once any were skipped; with fused
    Adam a skip is counted at the loop's next read of the device),
    each also as "<tag> vs samples" (x axis: consumed training samples) except skipped-train-samples;
    throughput/{batches,samples,tokens}_per_sec, throughput/device/..., throughput/micro_batch_size,
    throughput/global_batch_size (log_throughput_to_tensorboard; once `throughput_window_size` steps
    have run, over the last that many steps).

A step's loss and gradient norm stay on the device until the loop reads the device anyway (the log
line, an evaluation, a checkpoint, a stop, the end of training), so writing a point every step adds
no wait for the device: the points are kept until then and written with their own steps. W&B gets
the same scalars (without the "vs samples" copies) at the same steps. The throughput rates use the
host's clock, as upstream's do.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron.bridge.training.state import GlobalState
from megatron.bridge.training.step_ledger import StepOutcome, read_from_device

__all__ = ["VS_SAMPLES", "TrainingScalars", "write_scalars"]

VS_SAMPLES = frozenset({"learning-rate", "batch-size", "loss-scale", "grad-norm"})
"""Step scalars also written against consumed samples (the losses are too)."""


def write_scalars(state: GlobalState, scalars: dict[str, float], step: int, *, samples: int | None = None,
                  vs_samples: frozenset[str] | set[str] = frozenset()) -> None:
    """Write scalars to TensorBoard and W&B where configured (rank 0 only).

    Those named in `vs_samples` are also written to TensorBoard as "<name> vs samples" at x = `samples`.
    """
    writer = state.tensorboard_logger
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
            if name in vs_samples:
                writer.add_scalar(f"{name} vs samples", value, samples)
    if state.wandb_logger is not None:
        state.wandb_logger.log(scalars, step=step)


@dataclass
class _Point:
    step: int
    samples: int
    host: dict[str, float]
    device: dict[str, torch.Tensor | float]
    """The losses and the gradient norm: 0-dim device tensors until the flush reads them."""


class TrainingScalars:
    """Collects one point of training scalars every `tensorboard_log_interval` steps; `flush` writes them."""

    def __init__(self, state: GlobalState, *, world_size: int) -> None:
        self.state = state
        self.world_size = world_size
        cfg = state.cfg.logger
        self._window = cfg.throughput_window_size
        # (host time, tokens so far) at the end of each of the last `window` steps, and before them.
        self._history: deque[tuple[float, int]] = deque(maxlen=self._window + 1)
        self._tokens = 0
        self._points: list[_Point] = []

    def start(self) -> None:
        """Mark the start of training: the first throughput window begins here."""
        self._history.append((time.perf_counter(), self._tokens))

    def record(self, *, loss_dict: dict[str, torch.Tensor], outcome: StepOutcome, learning_rate: float,
               loss_scale: Callable[[], float], num_tokens: int) -> None:
        """Account for the step just counted in `train_state`; keep a point when the step is due.

        `loss_scale` is called only for a kept point (under fp16 reading the scale waits for the device).
        """
        self._tokens += num_tokens
        self._history.append((time.perf_counter(), self._tokens))
        cfg, train_state = self.state.cfg, self.state.train_state
        if train_state.step % cfg.logger.tensorboard_log_interval or not self._has_writers():
            return
        host = {"learning-rate": learning_rate, "batch-size": float(cfg.train.global_batch_size)}
        if cfg.logger.log_loss_scale_to_tensorboard:
            host["loss-scale"] = loss_scale()
        if train_state.skipped_train_samples > 0:
            host["skipped-train-samples"] = float(train_state.skipped_train_samples)
        if cfg.logger.log_throughput_to_tensorboard:
            host.update(self._throughput())
        device: dict[str, torch.Tensor | float] = {name: value.detach() for name, value in loss_dict.items()}
        if outcome.reports_norm and outcome.norm_on_device is not None:
            device["grad-norm"] = outcome.measured_norm if outcome.is_read else outcome.norm_on_device
        self._points.append(_Point(train_state.step, train_state.consumed_train_samples, host, device))

    def flush(self) -> None:
        """Write the kept points, reading their device values with one wait for the device."""
        points, self._points = self._points, []
        tensors = [value for point in points for value in point.device.values() if isinstance(value, torch.Tensor)]
        read = iter(read_from_device(tensors)) if tensors else iter(())
        for point in points:
            device = {name: next(read) if isinstance(value, torch.Tensor) else value
                      for name, value in point.device.items()}
            vs_samples = VS_SAMPLES | set(device)  # the losses too
            write_scalars(self.state, {**point.host, **device}, point.step, samples=point.samples,
                          vs_samples=vs_samples)

    def _has_writers(self) -> bool:
        return self.state.tensorboard_logger is not None or self.state.wandb_logger is not None

    def _throughput(self) -> dict[str, float]:
        # As upstream: nothing until the window is full, then rates over its last `window` steps.
        if len(self._history) <= self._window:
            return {}
        (start, start_tokens), (end, end_tokens) = self._history[0], self._history[-1]
        seconds = end - start
        if seconds <= 0:
            return {}
        train = self.state.cfg.train
        rates = {"batches_per_sec": self._window / seconds,
                 "samples_per_sec": self._window * train.global_batch_size / seconds,
                 "tokens_per_sec": (end_tokens - start_tokens) / seconds}
        scalars = {f"throughput/{name}": rate for name, rate in rates.items()}
        scalars.update({f"throughput/device/{name}": rate / self.world_size for name, rate in rates.items()})
        scalars["throughput/micro_batch_size"] = float(train.micro_batch_size)
        scalars["throughput/global_batch_size"] = float(train.global_batch_size)
        return scalars
