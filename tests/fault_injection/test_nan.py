"""NaN and infinity at every stage of a step: the update is skipped, counted, never saved, and reported.

Each case trains the tiny model for three steps and poisons one micro-batch of one step, either in its
loss (the loss and every gradient turn non-finite) or in its backward pass only (the loss stays
finite). Whatever the clipping and the precision, the poisoned update must leave the weights exactly
as they were, be counted (`skipped_train_samples`, the log line), never reach a checkpoint, and with
`ddp.check_for_nan_in_grad=True` end the run with an error naming the iteration.

Under fp16 loss scaling a non-finite gradient with a finite loss is what a loss-scale overflow looks
like: it is skipped and counted but is no error, and the scale backs off; only at the scale's floor
(`optimizer.min_loss_scale`) is it a NaN. The fp16 cases start at a loss scale of 1024, which the tiny
model never overflows, so that only the injected fault skips a step.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from helpers import make_tiny_config, shrink
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.recipes.qwen import qwen25_500m_pretrain_config, qwen25_tiny_pretrain_config
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

TRAIN_ITERS = 3
GLOBAL_BATCH = 4  # two micro-batches of two (the tiny test config)


class _PoisonBackward(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `value` (NaN or inf) in backward."""

    @staticmethod
    def forward(ctx, tensor, value):
        ctx.value = value
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


@dataclass(frozen=True)
class Fault:
    where: str
    """"loss": one micro-batch's loss is multiplied by `value`; "grad": only its gradients are."""
    value: float
    iteration: int
    """1-based iteration of the poisoned step."""

    def forward_step(self):
        """The default forward step, poisoning the second micro-batch of iteration `self.iteration`."""
        seen: dict[int, int] = {}

        def step(state, data_iterator, model):
            output, loss_func = forward_step(state, data_iterator, model)
            index = state.train_state.step
            seen[index] = seen.get(index, 0) + 1
            if not (model.training and index + 1 == self.iteration and seen[index] == 2):
                return output, loss_func
            if self.where == "grad":
                return _PoisonBackward.apply(output, self.value), loss_func

            def poisoned_loss(output_tensor):
                loss_sum, num_tokens, reports = loss_func(output_tensor)
                scale = torch.tensor([self.value, 1.0])
                return loss_sum * self.value, num_tokens, {k: v * scale for k, v in reports.items()}

            return output, poisoned_loss

        return step


@dataclass(frozen=True)
class Case:
    fault: Fault
    precision: str = "fp32"
    clip_grad: float = 1.0
    check_nan: bool = False
    at_scale_floor: bool = False
    """fp16 only: start at `min_loss_scale`, where no overflow can be blamed on the scale."""

    @property
    def is_overflow(self) -> bool:
        """True when the fault looks like a loss-scale overflow: skipped, but no NaN iteration."""
        return self.precision == "fp16_mixed" and self.fault.where == "grad" and not self.at_scale_floor

    @property
    def raises(self) -> bool:
        return self.check_nan and not self.is_overflow

    @property
    def id(self) -> str:
        f = self.fault
        parts = [f"{f.where}-{'nan' if math.isnan(f.value) else 'inf'}", f"iter{f.iteration}",
                 self.precision.split("_")[0], f"clip{self.clip_grad:g}", f"check-{'on' if self.check_nan else 'off'}"]
        return "-".join(parts + (["at-scale-floor"] if self.at_scale_floor else []))


NAN, INF = math.nan, math.inf
FIRST, MIDDLE, LAST = 1, 2, TRAIN_ITERS
CASES = [
    # fp32: the loss of one micro-batch, or only its gradients; first, middle and last step; clipping or not.
    Case(Fault("loss", NAN, MIDDLE)),
    Case(Fault("loss", NAN, MIDDLE), clip_grad=0.0),
    Case(Fault("loss", INF, FIRST)),
    Case(Fault("loss", INF, LAST), clip_grad=0.0),
    Case(Fault("grad", NAN, FIRST), clip_grad=0.0),
    Case(Fault("grad", NAN, MIDDLE)),
    Case(Fault("grad", INF, LAST)),
    Case(Fault("loss", NAN, MIDDLE), check_nan=True),
    Case(Fault("loss", NAN, FIRST), clip_grad=0.0, check_nan=True),
    Case(Fault("grad", INF, LAST), clip_grad=0.0, check_nan=True),
    # fp16 with loss scaling.
    Case(Fault("loss", NAN, MIDDLE), precision="fp16_mixed"),
    Case(Fault("loss", INF, LAST), precision="fp16_mixed", clip_grad=0.0),
    Case(Fault("grad", NAN, MIDDLE), precision="fp16_mixed"),
    Case(Fault("loss", NAN, MIDDLE), precision="fp16_mixed", check_nan=True),
    Case(Fault("loss", INF, FIRST), precision="fp16_mixed", clip_grad=0.0, check_nan=True),
    Case(Fault("grad", NAN, LAST), precision="fp16_mixed", check_nan=True),
    Case(Fault("grad", NAN, LAST), precision="fp16_mixed", clip_grad=0.0, at_scale_floor=True),
    Case(Fault("grad", INF, MIDDLE), precision="fp16_mixed", check_nan=True, at_scale_floor=True),
]


def _config(case: Case, save: Path):
    cfg = make_tiny_config(train__train_iters=TRAIN_ITERS, validation__eval_iters=0, logger__log_interval=1,
                           mixed_precision=case.precision, optimizer__clip_grad=case.clip_grad,
                           ddp__check_for_nan_in_grad=case.check_nan, checkpoint__save=str(save),
                           checkpoint__save_interval=1)
    if case.precision == "fp16_mixed":
        cfg.optimizer.initial_loss_scale = 1.0 if case.at_scale_floor else 1024.0
    return cfg


class _Watcher:
    """Snapshots of every parameter before and after each step, and each step's skip flag."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.skipped: dict[int, bool] = {}
        self.end: dict[str, int] = {}
        self.manager = CallbackManager()
        self.manager.register("on_train_step_start", lambda ctx: self.before.update({self._iteration(ctx): _flat(ctx)}))
        self.manager.register("on_train_step_end", self._step_end)
        self.manager.register("on_train_end", lambda ctx: self.end.update(
            skipped_samples=ctx.state.train_state.skipped_train_samples, scheduled=ctx.scheduler.num_steps))

    @staticmethod
    def _iteration(ctx) -> int:
        return ctx.state.train_state.step + 1

    def _step_end(self, ctx) -> None:
        iteration = self._iteration(ctx)
        self.after[iteration] = _flat(ctx)
        self.skipped[iteration] = ctx.skipped_iter


def _flat(ctx) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in ctx.model[0].parameters()]).clone()


def _checkpoint_tensors(save: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every saved iteration's model and optimizer tensors, read back from disk."""
    saved = {}
    for step in checkpoint_io.list_iterations(save):
        directory = checkpoint_io.iteration_dir(save, step)
        index = checkpoint_io.read_index(directory)
        tensors = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
                   for key, md in index.state_dict_metadata.items()
                   if isinstance(md, TensorStorageMetadata) and key.startswith(("model.", "optimizer."))}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            checkpoint_io.load_tensors(tensors, directory)
        saved[step] = tensors
    return saved


def _log_line(out: str, iteration: int) -> str:
    return next(line for line in out.splitlines() if f"iteration {iteration:8d}/" in line)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_non_finite_step_is_skipped_counted_and_never_saved(tmp_path, capsys, case):
    bad = case.fault.iteration
    save = tmp_path / "ckpt"
    watcher = _Watcher()
    if case.raises:
        with pytest.raises(RuntimeError, match=rf"gradient norm is (nan|inf) at iteration {bad}\b"):
            pretrain(_config(case, save), case.fault.forward_step(), callbacks=watcher.manager)
    else:
        pretrain(_config(case, save), case.fault.forward_step(), callbacks=watcher.manager)

    # The poisoned update left every weight exactly as it was; every other step trained.
    assert watcher.skipped[bad] is True
    assert torch.equal(watcher.before[bad], watcher.after[bad])
    assert all(not watcher.skipped[i] and not torch.equal(watcher.before[i], watcher.after[i])
               for i in watcher.after if i != bad)
    assert all(torch.isfinite(weights).all() for weights in watcher.after.values())

    # Counted, and shown in the bad step's log line (printed before a check_for_nan_in_grad error).
    line = _log_line(capsys.readouterr().out, bad)
    assert "number of skipped iterations:   1" in line, line
    assert f"number of nan iterations:   {0 if case.is_overflow else 1}" in line, line
    if case.raises:
        assert max(watcher.after) == bad  # the run stopped right after the bad step
    else:
        assert watcher.end == {"skipped_samples": GLOBAL_BATCH, "scheduled": TRAIN_ITERS - 1}

    # No checkpoint holds a non-finite value; the bad step's checkpoint repeats the one before it.
    saved = _checkpoint_tensors(save)
    assert sorted(saved) == (list(range(1, bad)) if case.raises else list(range(1, TRAIN_ITERS + 1)))
    for step, tensors in saved.items():
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), step
    if not case.raises and bad > 1:
        before, after = saved[bad - 1], saved[bad]
        assert all(torch.equal(after[key], before[key]) for key in before if key.startswith("model."))


# ------------------------------------------------------------- fp16: a loss-scale overflow is not a NaN


def _fp16(recipe):
    cfg = shrink(recipe())
    cfg.train.train_iters = 6
    cfg.scheduler.lr_warmup_iters = 1
    cfg.validation.eval_interval = None
    cfg.validation.eval_iters = 1
    cfg.logger.log_interval = 1
    cfg.mixed_precision = "fp16_mixed"
    cfg.optimizer.bf16 = False  # the larger recipes train in bf16; fp16_mixed must not contradict it
    cfg.ddp.check_for_nan_in_grad = True
    return cfg


@pytest.mark.parametrize("recipe", [qwen25_tiny_pretrain_config, qwen25_500m_pretrain_config],
                         ids=["tiny", "500m-shrunk"])
def test_fp16_recipes_train_through_the_loss_scale_overflows_of_the_first_steps(chdir, capsys, recipe):
    watcher = _Watcher()
    pretrain(_fp16(recipe), forward_step, callbacks=watcher.manager)
    out = capsys.readouterr().out
    lines = [_log_line(out, i) for i in range(1, 7)]
    scales = [float(re.search(r"loss scale: ([0-9.]+)", line).group(1)) for line in lines]
    overflows = [i for i, skipped in watcher.skipped.items() if skipped]
    # The default scale (2**16) overflows at first; each overflow halves it until steps go through.
    assert overflows and overflows == list(range(1, len(overflows) + 1)) and len(overflows) < 6
    assert scales[len(overflows) - 1] == 2.0**16 / 2 ** len(overflows)
    assert all(f"number of skipped iterations:   {int(i in overflows)}" in line for i, line in enumerate(lines, 1))
    assert all("number of nan iterations:   0" in line for line in lines)
    assert watcher.end["skipped_samples"] == len(overflows) * 4
    assert all(torch.isfinite(weights).all() for weights in watcher.after.values())
    assert not torch.equal(watcher.before[6], watcher.after[6])  # it trains
