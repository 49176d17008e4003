"""The log line, the loop's timer report, validation and test results, and model FLOPs.

The log line comes after the first iteration of a run, every `logger.log_interval` iterations and
after the last one. TensorBoard and W&B scalars are written by `scalar_writer` (one point per
`logger.tensorboard_log_interval`); the log line adds what only it measures (see `MetricsLogger`).

Model FLOPs per token (the formula behind TFLOP/s and MFU):

    6 * N  +  6 * num_layers * seq_length * (num_attention_heads * kv_channels)

N counts every weight a token's forward pass multiplies by: all parameters except the input
embedding, plus the output layer (with tied embeddings the shared matrix is counted once, as the
output layer). The factor 6 is 2 FLOPs per multiply-add times 3 for forward plus backward. The
second term is causal self-attention: QK^T and AV cost 2 * d * S each per token, halved by the causal
mask, times 3.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.memory import resident_bytes
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.scalar_writer import TrainingScalars, write_scalars
from megatron.bridge.training.state import GlobalState
from megatron.bridge.training.step_ledger import StepOutcome
from megatron.bridge.utils.logging import print_rank_0

__all__ = [
    "LOOP_TIMERS",
    "PEAK_BF16_TFLOPS",
    "MetricsLogger",
    "RunTotals",
    "StepResult",
    "log_eval_losses",
    "model_flops_per_token",
    "peak_tflops",
]

# Dense bf16 peak rates per device, in TFLOP/s, for MFU; the first key found in the device name wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

LOOP_TIMERS = ("forward-backward", "all-grads-sync", "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad",
               "optimizer-inner-step", "optimizer")
"""The training step's timers (log level 1, Megatron's names); with `logger.timing_log_level >= 1` the
log line is followed by their times, averaged over the steps since the previous line."""


def model_flops_per_token(model: torch.nn.Module, *, num_layers: int, seq_length: int, attention_width: int) -> float:
    """Training FLOPs per token by the formula in this module's docstring."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    embedding = getattr(model, "embedding", None)
    output_layer = getattr(model, "output_layer", None)
    if embedding is not None and output_layer is not None:
        total -= embedding.weight.numel()  # untied: the input lookup does no multiplies
    return 6.0 * total + 6.0 * num_layers * seq_length * attention_width


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, when known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((rate for key, rate in PEAK_BF16_TFLOPS.items() if key in name), None)


@dataclass
class StepResult:
    """What one training step produced."""

    loss_dict: dict[str, torch.Tensor]
    """Token-weighted mean losses over the global batch (0-dim tensors, on the device)."""
    outcome: StepOutcome
    """The gradient norm and skip decision, read from the device on first use."""
    num_tokens: int
    """Tokens processed in the step, summed over ranks."""

    @property
    def grad_norm(self) -> float | None:
        """Total gradient norm before clipping; None when not computed. The first read waits for the device."""
        return self.outcome.grad_norm

    @property
    def skipped_iter(self) -> bool:
        """True when the update was not applied. The first read waits for the device."""
        return self.outcome.skipped


@dataclass
class RunTotals:
    """What this run's training loop did, for the summary at the end."""

    steps: int = 0
    """Steps trained by this run (a resumed run counts from where it resumed)."""
    tokens: int = 0
    """Tokens fed to the model in those steps, summed over ranks."""
    train_seconds: float = 0.0
    """Wall time of the training loop."""
    last_losses: dict[str, float] = field(default_factory=dict)
    """The training losses of the last log line (means over its steps)."""


class MetricsLogger:
    """Prints a Megatron-style line after the first, every `log_interval`-th and the last iteration.

    Besides Megatron's fields the line shows the time since training started, the remaining time
    (from the average step time so far) and memory: the peak allocated on a GPU, the resident set
    on a CPU. TensorBoard gets `iteration-time` (with `log_timers_to_tensorboard`) and
    `throughput/tflops/device`, `throughput/tflops` (with `log_throughput_to_tensorboard`) here.
    """

    def __init__(self, state: GlobalState, *, flops_per_token: float, world_size: int,
                 device: torch.device, callbacks: CallbackManager | None = None,
                 precision: MixedPrecision | None = None) -> None:
        self.state = state
        self.callbacks = callbacks
        self.precision = precision
        """Where the log line reads the loss scale (None: 1.0)."""
        self._warned: set[str] = set()
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.device = device
        self.peak_tflops = peak_tflops(device)
        self.scalars = TrainingScalars(state, world_size=world_size)
        self.totals = RunTotals()
        self._first_step = 1
        self._loop_start: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        # Sums stay on the device (no waiting per step), in constant memory however long the window.
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._skipped: torch.Tensor | float = 0.0
        self._overflows = 0
        self._steps = 0
        self._tokens = 0
        self._window_start = time.perf_counter()  # wall time, for the callbacks' share (evaluations included)
        if self.callbacks is not None:
            self._callback_seconds = self.callbacks.seconds_by_callback()

    def begin(self) -> None:
        """Training starts: its first iteration will be logged; the clock and the `interval-time` timer start."""
        self._first_step = self.state.train_state.step + 1
        self._loop_start = time.perf_counter()
        self.state.timers("interval-time", log_level=0).start()
        self.scalars.start()
        self._reset_window()

    def end(self) -> None:
        """Training ended: write the TensorBoard points still kept, stop the clock."""
        self.scalars.flush()
        if self._loop_start is not None:
            self.totals.train_seconds = time.perf_counter() - self._loop_start
            self.state.timers("interval-time", log_level=0).stop()
            self._loop_start = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (an evaluation, a checkpoint) out of the iteration time, as Megatron does."""
        timer = self.state.timers("interval-time", log_level=0)
        running = timer.active
        if running:
            timer.stop()
        try:
            yield
        finally:
            if running:
                timer.start()

    def is_due(self, step: int) -> bool:
        """True when `step` ends with a log line (whose values are read from the device)."""
        return (step % self.state.cfg.logger.log_interval == 0 or step == self._first_step
                or step == self.state.cfg.train.train_iters)

    def maybe_log(self, result: StepResult, *, learning_rate: float, flush: bool = False) -> None:
        """Account for one step; print and write scalars when it is due. `flush`: the device was just read."""
        self._steps += 1
        self._tokens += result.num_tokens
        self.totals.steps += 1
        self.totals.tokens += result.num_tokens
        found_inf = result.outcome.found_inf
        for name, value in result.loss_dict.items():
            value = value.detach()
            if found_inf is not None:  # a skipped step's loss (often NaN) stays out of the mean
                value = torch.where(found_inf > 0, 0.0, value)
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value
        if found_inf is not None:
            self._skipped = self._skipped + found_inf
        self._overflows += result.outcome.overflow
        self.scalars.record(loss_dict=result.loss_dict, outcome=result.outcome, learning_rate=learning_rate,
                            loss_scale=self._loss_scale, num_tokens=result.num_tokens)
        step = self.state.train_state.step
        if self.is_due(step):
            self._log(step, result, learning_rate)
            self._reset_window()
        elif flush:
            self.scalars.flush()

    def flush(self) -> None:
        """Write the TensorBoard points kept so far (call where the loop has just read the device)."""
        self.scalars.flush()

    def _loss_scale(self) -> float:
        return 1.0 if self.precision is None else self.precision.loss_scale

    def _log(self, step: int, result: StepResult, learning_rate: float) -> None:
        cfg = self.state.cfg
        # Reading the sums waits for the device, so the window's time includes all of its work.
        steps, skipped = self._steps, int(float(self._skipped))
        applied = steps - skipped
        losses = {name: float(total) / applied for name, total in self._loss_sums.items()} if applied else {}
        if losses:
            self.totals.last_losses = losses
        self.scalars.flush()
        elapsed = self.state.timers("interval-time", log_level=0).elapsed(reset=True)
        ms_per_step = 1000.0 * elapsed / steps
        tokens_per_s = self._tokens / elapsed / self.world_size
        tflops = tokens_per_s * self.flops_per_token / 1e12
        parts = [
            f"iteration {step:8d}/{cfg.train.train_iters:8d}",
            f"consumed samples: {self.state.train_state.consumed_train_samples:12d}",
            f"elapsed time per iteration (ms): {ms_per_step:.1f}",
            f"learning rate: {learning_rate:.6E}",
            f"global batch size: {cfg.train.global_batch_size:5d}",
            *(f"{name}: {value:.6E}" for name, value in losses.items()),
            f"loss scale: {self._loss_scale():.1f}",
        ]
        if result.grad_norm is not None:
            parts.append(f"grad norm: {result.grad_norm:.3f}")
        # Only a non-finite gradient norm skips a step; it is a nan iteration unless the loss scale overflowed.
        nan_iterations = skipped - self._overflows
        parts += [f"number of skipped iterations: {skipped:3d}", f"number of nan iterations: {nan_iterations:3d}"]
        if cfg.logger.log_throughput:
            parts += [f"tokens per second per device: {tokens_per_s:.0f}",
                      f"throughput per device (TFLOP/s): {tflops:.3f}"]
            if self.peak_tflops:
                parts.append(f"MFU: {100.0 * tflops / self.peak_tflops:.1f}%")
        parts += self._progress(step)
        scalars: dict[str, float] = {}
        if cfg.logger.log_throughput_to_tensorboard:
            scalars.update({"throughput/tflops/device": tflops, "throughput/tflops": tflops * self.world_size})
        if cfg.logger.log_timers_to_tensorboard:
            scalars["iteration-time"] = elapsed / steps
        if self.callbacks is not None:
            parts += self._callback_time(time.perf_counter() - self._window_start, scalars)
        print_rank_0(f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] " + " | ".join(parts) + " |")
        write_scalars(self.state, scalars, step)
        self._report_timers(step, steps)

    def _progress(self, step: int) -> list[str]:
        """Time since training started, the remaining time, and memory."""
        spent = time.perf_counter() - self._loop_start if self._loop_start is not None else 0.0
        remaining = spent / max(self.totals.steps, 1) * max(self.state.cfg.train.train_iters - step, 0)
        parts = [f"time elapsed: {_clock(spent)}", f"ETA: {_clock(remaining)}"]
        if self.device.type == "cuda":
            parts.append(f"peak allocated memory (GiB): {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f}")
        else:
            parts.append(f"memory RSS (GiB): {resident_bytes() / 2**30:.2f}")
        return parts

    def _report_timers(self, step: int, steps: int) -> None:
        # Every rank gathers (the calls are collective): what runs depends on the config alone.
        timers, log_cfg = self.state.timers, self.state.cfg.logger
        names = [name for name in LOOP_TIMERS if name in timers.names()]
        if not names:
            return
        if log_cfg.log_timers_to_tensorboard:
            timers.write(names, self.state.tensorboard_logger, step, normalizer=steps)
            if log_cfg.wandb_project:
                timers.write(names, self.state.wandb_logger, step, normalizer=steps)
        timers.log(names, rank=0, normalizer=steps)

    def _callback_time(self, elapsed: float, scalars: dict[str, float]) -> list[str]:
        """The log-line part for time spent in callbacks, and a one-time warning per slow callback."""
        spent = {name: seconds - self._callback_seconds.get(name, 0.0)
                 for name, seconds in self.callbacks.seconds_by_callback().items()}
        share = sum(spent.values()) / elapsed
        scalars["callback-time-share"] = share
        limit = self.state.cfg.logger.callback_time_warning_share
        for name, seconds in spent.items():
            if seconds / elapsed > limit and name not in self._warned:
                self._warned.add(name)
                print_rank_0(f"> warning: callback {name} took {100 * seconds / elapsed:.0f}% of the step time "
                             f"(above logger.callback_time_warning_share={limit}); see CallbackManager.stats()")
        return [f"callbacks: {100 * share:.1f}% of step time"] if share > 0.01 else []


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def log_eval_losses(state: GlobalState, label: str, total_loss_dict: dict[str, torch.Tensor], *,
                    final: bool = False) -> None:
    """Print and write validation (`label="validation"`) or test losses, and their perplexities.

    `final`: the pass after training. Its header says so, and its validation losses go to their own
    TensorBoard tags (`lm loss validation final`), apart from the in-training ones (`lm loss validation`)
    that may share its step. Perplexities go to TensorBoard with `log_validation_ppl_to_tensorboard`.
    """
    train_state = state.train_state
    step = train_state.step
    suffix = " final" if final and label == "validation" else ""
    parts, scalars = [], {}
    for name, value in total_loss_dict.items():
        loss = float(value)
        ppl = math.exp(min(20.0, loss))
        parts.append(f"{name} value: {loss:.6E} | {name} PPL: {ppl:.6E}")
        scalars[f"{name} {label}{suffix}"] = loss
        if state.cfg.logger.log_validation_ppl_to_tensorboard:
            scalars[f"{name} {label}{suffix} ppl"] = ppl
    where = f"the end of training (iteration {step})" if final else f"iteration {step}"
    line = f" {label} loss at {where} | " + " | ".join(parts)
    print_rank_0("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    write_scalars(state, scalars, step, samples=train_state.consumed_train_samples, vs_samples=set(scalars))
