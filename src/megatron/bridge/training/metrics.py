"""The log line, TensorBoard / W&B scalars, and model FLOPs.

Model FLOPs per token (the formula behind TFLOP/s and MFU):

    6 * N  +  6 * num_layers * seq_length * (num_attention_heads * kv_channels)

N counts every weight a token's forward pass multiplies by: all parameters except the input
embedding, plus the output layer (with tied embeddings the shared matrix is counted once, as the
output layer). The factor 6 is 2 FLOPs per multiply-add times 3 for forward plus backward. The
second term is causal self-attention: QK^T and AV cost 2 * d * S each per token, halved by the causal
mask, times 3.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime

import torch

from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.state import GlobalState
from megatron.bridge.training.step_ledger import StepOutcome
from megatron.bridge.utils.logging import print_rank_0

# Dense bf16 peak rates per device, in TFLOP/s, for MFU; the first key found in the device name wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


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


class MetricsLogger:
    """Prints a Megatron-style line every `log_interval` steps and writes the same scalars."""

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
        self.peak_tflops = peak_tflops(device)
        self._reset_window()

    def _reset_window(self) -> None:
        # Sums stay on the device (no waiting per step), in constant memory however long the window.
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._skipped: torch.Tensor | float = 0.0
        self._overflows = 0
        self._steps = 0
        self._tokens = 0
        self._window_start = time.perf_counter()
        if self.callbacks is not None:
            self._callback_seconds = self.callbacks.seconds_by_callback()

    def is_due(self, step: int) -> bool:
        """True when `step` ends with a log line (whose values are read from the device)."""
        return step % self.state.cfg.logger.log_interval == 0

    def maybe_log(self, result: StepResult, *, learning_rate: float) -> None:
        """Accumulate one step; print and write scalars when the step is a multiple of log_interval."""
        self._steps += 1
        self._tokens += result.num_tokens
        found_inf = result.outcome.found_inf
        for name, value in result.loss_dict.items():
            value = value.detach()
            if found_inf is not None:  # a skipped step's loss (often NaN) stays out of the mean
                value = torch.where(found_inf > 0, 0.0, value)
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value
        if found_inf is not None:
            self._skipped = self._skipped + found_inf
        self._overflows += result.outcome.overflow
        step = self.state.train_state.step
        if self.is_due(step):
            self._log(step, result, learning_rate)
            self._reset_window()

    def _log(self, step: int, result: StepResult, learning_rate: float) -> None:
        cfg = self.state.cfg
        # Reading the sums waits for the device, so the window's time includes all of its work.
        steps, skipped = self._steps, int(float(self._skipped))
        applied = steps - skipped
        losses = {name: float(total) / applied for name, total in self._loss_sums.items()} if applied else {}
        elapsed = time.perf_counter() - self._window_start
        ms_per_step = 1000.0 * elapsed / steps
        tokens_per_s = self._tokens / elapsed / self.world_size
        tflops = tokens_per_s * self.flops_per_token / 1e12
        scalars = {"learning-rate": learning_rate, **losses, "iteration-time": elapsed / steps,
                   "tokens-per-second-per-device": tokens_per_s, "throughput-tflops-per-device": tflops}
        parts = [
            f"iteration {step:8d}/{cfg.train.train_iters:8d}",
            f"consumed samples: {self.state.train_state.consumed_train_samples:12d}",
            f"elapsed time per iteration (ms): {ms_per_step:.1f}",
            f"learning rate: {learning_rate:.6E}",
            f"global batch size: {cfg.train.global_batch_size:5d}",
            *(f"{name}: {value:.6E}" for name, value in losses.items()),
        ]
        loss_scale = 1.0 if self.precision is None else self.precision.loss_scale
        parts.append(f"loss scale: {loss_scale:.1f}")
        scalars["loss-scale"] = loss_scale
        if result.grad_norm is not None:
            parts.append(f"grad norm: {result.grad_norm:.3f}")
            scalars["grad-norm"] = result.grad_norm
        # Only a non-finite gradient norm skips a step; it is a nan iteration unless the loss scale overflowed.
        nan_iterations = skipped - self._overflows
        parts += [f"number of skipped iterations: {skipped:3d}", f"number of nan iterations: {nan_iterations:3d}"]
        if cfg.logger.log_throughput:
            parts += [f"tokens per second per device: {tokens_per_s:.0f}",
                      f"throughput per device (TFLOP/s): {tflops:.3f}"]
            if self.peak_tflops:
                parts.append(f"MFU: {100.0 * tflops / self.peak_tflops:.1f}%")
        if self.callbacks is not None:
            parts += self._callback_time(elapsed, scalars)
        print_rank_0(f" [{datetime.now():%Y-%m-%d %H:%M:%S}] " + " | ".join(parts) + " |")
        timers_off = () if self.state.cfg.logger.log_timers_to_tensorboard else ("iteration-time",)
        write_scalars(self.state, scalars, step, not_to_tensorboard=timers_off)

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


def write_scalars(state: GlobalState, scalars: dict[str, float], step: int, *,
                  not_to_tensorboard: tuple[str, ...] = ()) -> None:
    """Write scalars to TensorBoard and Weights & Biases, where configured (rank 0 only)."""
    writer = state.tensorboard_logger
    if writer is not None:
        for name, value in scalars.items():
            if name not in not_to_tensorboard:
                writer.add_scalar(name, value, step)
    if state.wandb_logger is not None:
        state.wandb_logger.log(scalars, step=step)


def log_eval_losses(state: GlobalState, label: str, total_loss_dict: dict[str, torch.Tensor]) -> None:
    """Print and write validation or test losses and their perplexities."""
    step = state.train_state.step
    parts, scalars = [], {}
    for name, value in total_loss_dict.items():
        loss = float(value)
        ppl = math.exp(min(20.0, loss))
        parts.append(f"{name} value: {loss:.6E} | {name} PPL: {ppl:.6E}")
        scalars[f"{name} {label}"] = loss
        scalars[f"{name} {label} ppl"] = ppl
    line = f" {label} loss at iteration {step} | " + " | ".join(parts)
    print_rank_0("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    write_scalars(state, scalars, step)
