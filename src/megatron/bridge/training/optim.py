"""Optimizer, learning-rate / weight-decay scheduler and gradient clipping.

`setup_optimizer` turns `OptimizerConfig` and `SchedulerConfig` into a `torch.optim` optimizer with
parameter groups (decay and no-decay, and with `lr_mult` a scaled pair) and an `OptimizerParamScheduler`
that owns the learning rate and weight decay of every group, with Megatron-LM's semantics: each group
carries its own `max_lr` / `min_lr` (set when the groups are built), and only `wd_mult` applies at step
time. `get_grad_norm` computes the global gradient norm and clips the gradients without synchronising
with the host.

Everything counts in optimizer steps (iterations). (Megatron-LM's own training loop advances its
scheduler by the global batch size, so its `num_steps` and step counts are in samples.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from megatron.bridge.training.config import (
    LR_DECAY_STYLES,
    WEIGHT_DECAY_INCR_STYLES,
    WSD_DECAY_STYLES,
    OptimizerConfig,
    SchedulerConfig,
    capped_warmup_iters,
)

__all__ = [
    "OptimizerParamScheduler",
    "default_wsd_decay_steps",
    "get_canonical_lr_for_logging",
    "get_grad_norm",
    "get_grad_norm_and_clip",
    "setup_optimizer",
]

# Each maps the fraction r in [0, 1] of a decay phase to the share of (max_lr - min_lr) still left:
# 1 at r=0, 0 at r=1.
_DECAY_COEFFICIENTS: dict[str, Callable[[float], float]] = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: 0.5 * (math.cos(math.pi * r) + 1.0),
    "exponential": lambda r: 2.0 * 0.5**r - 1.0,
    "minus_sqrt": lambda r: 1.0 - math.sqrt(r),
}

# The schedule's own fields, each with the type it is stored as. `state_dict` holds exactly these plus
# `num_steps`, all plain Python values, so a checkpoint loads with `torch.load(weights_only=True)`.
_SCHEDULE_FIELDS: dict[str, type] = {
    "init_lr": float,
    "max_lr": float,
    "min_lr": float,
    "lr_warmup_steps": int,
    "lr_decay_steps": int,
    "lr_decay_style": str,
    "wsd_decay_steps": int,
    "lr_wsd_decay_style": str,
    "start_wd": float,
    "end_wd": float,
    "wd_incr_steps": int,
    "wd_incr_style": str,
}


def schedule_state_template() -> dict[str, Any]:
    """A scheduler `state_dict()` of the right keys and types (zeros and empty strings), for checking one."""
    return {**{name: kind() for name, kind in _SCHEDULE_FIELDS.items()}, "num_steps": 0}


# Older names Megatron-LM's scheduler still reads in a state dict, for the field each stands for.
_LEGACY_STATE_KEYS: dict[str, tuple[str, ...]] = {
    "max_lr": ("start_lr",),
    "lr_warmup_steps": ("warmup_iter", "warmup_steps"),
    "lr_decay_steps": ("end_iter", "decay_steps"),
    "lr_decay_style": ("decay_style",),
    "num_steps": ("num_iters",),
}


def get_canonical_lr_for_logging(param_groups: list[dict[str, Any]]) -> float | None:
    """The learning rate of the first group marked `default_config=True`, or None when there is none.

    As Megatron-LM's function of that name: the groups on the default schedule (no group-specific
    `max_lr` / `min_lr`) share one rate, so the first of them stands for the run in logs.
    """
    for group in param_groups:
        if group.get("default_config", False):
            return group.get("lr")
    return None


def default_wsd_decay_steps(lr_warmup_steps: int, lr_decay_steps: int) -> int:
    """WSD's final decay length when none is given: 10% of the decay span, at least one step."""
    return max(1, (lr_decay_steps - lr_warmup_steps) // 10)


class OptimizerParamScheduler:
    """Learning-rate warm-up/decay and weight-decay increment, written into every param group.

    The learning rate warms up linearly from `init_lr` to `max_lr` over `lr_warmup_steps`, then follows
    `lr_decay_style` ("constant", "linear", "cosine" or "WSD") down to `min_lr` at `lr_decay_steps`, and
    stays at `min_lr` afterwards. Linear and cosine decay span steps `lr_warmup_steps..lr_decay_steps`;
    WSD holds `max_lr` until `lr_decay_steps - wsd_decay_steps` and then decays with
    `lr_wsd_decay_style` ("linear", "cosine", "exponential" or "minus_sqrt"). `wsd_decay_steps=None`
    means 10% of the decay span (at least one step).

    Weight decay moves from `start_wd` to `end_wd` over `wd_incr_steps` with `wd_incr_style`
    ("constant", which needs `start_wd == end_wd`, "linear" or "cosine").

    As in Megatron-LM, each group receives `lr = get_lr(group)`, where the group's own "max_lr" and
    "min_lr" (when it has them) replace the scheduler's, and `weight_decay = get_wd(group) *
    group.get("wd_mult", 1.0)`, where the group's own "start_wd" / "end_wd" replace the scheduler's.
    A group's "lr_mult" is never read here: `setup_optimizer` folds it into the group's "max_lr" and
    "min_lr" when it builds the groups. The constructor applies step 0 right away, so the first
    optimizer step already uses the warm-up's initial learning rate; call `step()` after every
    optimizer step.

    With `override_opt_param_scheduler=True`, `load_state_dict` restores only the step count and keeps
    the schedule given here; otherwise the checkpoint's schedule replaces it. A state dict written by
    Megatron-LM's scheduler loads too (its keys are a subset of ours; its older names are read as well).
    """

    def __init__(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str,
        wsd_decay_steps: int | None = None,
        lr_wsd_decay_style: str = "exponential",
        override_opt_param_scheduler: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.lr_decay_steps = int(lr_decay_steps)
        self.lr_decay_style = lr_decay_style
        if wsd_decay_steps is None:
            wsd_decay_steps = default_wsd_decay_steps(self.lr_warmup_steps, self.lr_decay_steps)
        self.wsd_decay_steps = int(wsd_decay_steps)
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps)
        self.wd_incr_style = wd_incr_style
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self._validate()
        self.num_steps = 0
        self.step(increment=0)

    def _validate(self) -> None:
        # Checked again after loading a checkpoint's schedule, hence a method of its own.
        checks = [
            (self.lr_decay_style in LR_DECAY_STYLES, "lr_decay_style", f"one of {LR_DECAY_STYLES}"),
            (self.lr_wsd_decay_style in WSD_DECAY_STYLES, "lr_wsd_decay_style", f"one of {WSD_DECAY_STYLES}"),
            (self.wd_incr_style in WEIGHT_DECAY_INCR_STYLES, "wd_incr_style",
             f"one of {WEIGHT_DECAY_INCR_STYLES}"),
            (self.lr_decay_steps > 0, "lr_decay_steps", "a positive integer"),
            (0 <= self.lr_warmup_steps <= self.lr_decay_steps, "lr_warmup_steps",
             f"an integer in [0, lr_decay_steps={self.lr_decay_steps}]"),
            (self.wsd_decay_steps > 0, "wsd_decay_steps", "a positive integer"),
            (self.init_lr >= 0.0, "init_lr", "a number >= 0"),
            (0.0 <= self.min_lr <= self.max_lr, "min_lr", f"a number in [0, max_lr={self.max_lr}]"),
            (self.start_wd >= 0.0 and self.end_wd >= 0.0, "start_wd", "start_wd and end_wd >= 0"),
            (self.wd_incr_steps >= 0, "wd_incr_steps", "an integer >= 0"),
            (self.wd_incr_style != "constant" or self.start_wd == self.end_wd, "end_wd",
             f"equal to start_wd={self.start_wd} with wd_incr_style='constant'"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

    def get_lr(self, param_group: dict[str, Any] | None = None) -> float:
        """The scheduled learning rate at `num_steps`, before the group's `lr_mult`.

        A `param_group` carrying "max_lr" / "min_lr" uses those instead of the scheduler's.
        """
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        step = self.num_steps
        if self.lr_warmup_steps > 0 and step <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * step / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if step > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "WSD":
            stable_end = self.lr_decay_steps - self.wsd_decay_steps
            # The stable phase is min_lr + 1 * (max_lr - min_lr), as Megatron-LM computes it, to the last bit.
            ratio = max(step - stable_end, 0) / self.wsd_decay_steps
            coeff = 1.0 if step <= stable_end else _DECAY_COEFFICIENTS[self.lr_wsd_decay_style](ratio)
        else:
            # Non-zero: here lr_warmup_steps < step <= lr_decay_steps (or no warm-up at all).
            span = self.lr_decay_steps - self.lr_warmup_steps
            ratio = (step - self.lr_warmup_steps) / span
            coeff = _DECAY_COEFFICIENTS[self.lr_decay_style](ratio)
        return min_lr + coeff * (max_lr - min_lr)

    def get_wd(self, param_group: dict[str, Any] | None = None) -> float:
        """The scheduled weight decay at `num_steps`, before the group's `wd_mult`.

        A `param_group` carrying "start_wd" / "end_wd" uses those instead of the scheduler's.
        """
        group = param_group or {}
        start_wd = group.get("start_wd", self.start_wd)
        end_wd = group.get("end_wd", self.end_wd)
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps:
            return end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:
            # Cosine increment: slow at both ends, 0 at ratio 0 and 1 at ratio 1.
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return start_wd + coeff * (end_wd - start_wd)

    def step(self, increment: int = 1) -> None:
        """Advance by `increment` optimizer steps and write lr and weight decay into every group."""
        self.num_steps += increment
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The step count and the schedule, as plain Python numbers and strings."""
        state = {name: kind(getattr(self, name)) for name, kind in _SCHEDULE_FIELDS.items()}
        state["num_steps"] = int(self.num_steps)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count (and, unless overriding, the schedule) and re-apply it to the groups.

        Call it after `optimizer.load_state_dict`, which would otherwise overwrite the groups' lr and
        weight decay with the checkpoint's stale values. Schedule fields missing from an older
        checkpoint (or from one of Megatron-LM's, which has no `init_lr` or WSD fields) keep the
        constructor's values.
        """
        state_dict = _canonical_state(state_dict)
        if not self.override_opt_param_scheduler:
            for name, kind in _SCHEDULE_FIELDS.items():
                if name in state_dict:
                    setattr(self, name, kind(state_dict[name]))
            self._validate()
        self.num_steps = int(state_dict["num_steps"])
        self.step(increment=0)


def _canonical_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` with Megatron-LM's older key names read as today's (a current name wins)."""
    state = dict(state_dict)
    for name, legacy_names in _LEGACY_STATE_KEYS.items():
        for legacy in legacy_names:
            if name not in state and legacy in state:
                state[name] = state.pop(legacy)
    if "num_steps" not in state:
        raise KeyError("num_steps (the scheduler's step count) is missing")
    return state


def _unique_trainable_params(model_chunks: Iterable[nn.Module]) -> list[nn.Parameter]:
    # Tied weights (e.g. embedding and output layer) appear in several modules or chunks; an optimizer
    # given the same tensor twice would update it twice.
    seen: set[int] = set()
    params = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


ScaleLrCond = Callable[[str, nn.Parameter], bool]
"""`(name, param) -> bool`: True for a parameter whose learning rate `lr_mult` scales."""


def _param_groups(model_chunks: Iterable[nn.Module], *, lr: float, min_lr: float,
                  scale_lr_cond: ScaleLrCond | None = None, lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Decay / no-decay groups, each scaled or not, with Megatron-LM's keys; empty groups left out.

    A scaled group's `max_lr` and `min_lr` are `lr * lr_mult` and `min_lr * lr_mult`, fixed here (the
    scheduler reads them, never `lr_mult`); it is not on the default schedule (`default_config=False`).
    """
    names = {id(param): name for chunk in model_chunks for name, param in chunk.named_parameters()}
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in _unique_trainable_params(model_chunks):
        # Biases and norm weights are vectors; decaying them towards zero only hurts.
        scaled = scale_lr_cond is not None and lr_mult != 1.0 and scale_lr_cond(names[id(param)], param)
        buckets.setdefault((param.ndim >= 2, scaled), []).append(param)
    groups = []
    for decays, scaled in ((True, False), (False, False), (True, True), (False, True)):
        if (decays, scaled) in buckets:
            mult = lr_mult if scaled else 1.0
            groups.append({"params": buckets[(decays, scaled)], "wd_mult": 1.0 if decays else 0.0, "lr_mult": mult,
                           "max_lr": lr * mult, "min_lr": min_lr * mult, "default_config": not scaled})
    return groups


def _build_scheduler(
    optimizer: torch.optim.Optimizer,
    optimizer_config: OptimizerConfig,
    scheduler_config: SchedulerConfig,
    train_iters: int,
) -> OptimizerParamScheduler:
    base_wd = optimizer_config.weight_decay
    decay_steps = scheduler_config.lr_decay_iters or train_iters
    start_wd = scheduler_config.start_weight_decay
    end_wd = scheduler_config.end_weight_decay
    return OptimizerParamScheduler(
        optimizer=optimizer,
        init_lr=scheduler_config.lr_warmup_init,
        max_lr=optimizer_config.lr,
        min_lr=optimizer_config.min_lr,
        lr_warmup_steps=capped_warmup_iters(scheduler_config.lr_warmup_iters, decay_steps),
        lr_decay_steps=decay_steps,
        lr_decay_style=scheduler_config.lr_decay_style,
        start_wd=base_wd if start_wd is None else start_wd,
        end_wd=base_wd if end_wd is None else end_wd,
        wd_incr_steps=train_iters,
        wd_incr_style=scheduler_config.weight_decay_incr_style,
        wsd_decay_steps=scheduler_config.lr_wsd_decay_iters,
        lr_wsd_decay_style=scheduler_config.lr_wsd_decay_style,
        override_opt_param_scheduler=scheduler_config.override_opt_param_scheduler,
    )


def setup_optimizer(
    optimizer_config: OptimizerConfig,
    scheduler_config: SchedulerConfig,
    model_chunks: list[nn.Module],
    *,
    train_iters: int,
    scale_lr_cond: ScaleLrCond | None = None,
    lr_mult: float = 1.0,
) -> tuple[torch.optim.Optimizer, OptimizerParamScheduler]:
    """Build the optimizer over all chunks' trainable parameters, and its scheduler.

    Parameters with two or more dimensions go into a decay group (`wd_mult=1.0`), the rest (biases,
    norm weights) into a no-decay group (`wd_mult=0.0`); an empty group is left out. Shared (tied)
    parameters are counted once. Every group carries Megatron-LM's keys: `max_lr` and `min_lr`
    (`optimizer.lr` and `optimizer.min_lr`), `wd_mult`, `lr_mult` and `default_config`. Parameters for
    which `scale_lr_cond(name, param)` is True go into groups of their own whose `max_lr` and `min_lr`
    are multiplied by `lr_mult` (as Megatron-LM's `scale_lr_cond` / `lr_mult`). Since the groups carry
    their own peak and floor, these follow this config also when a resume loads a checkpoint's schedule.

    `adam` is `torch.optim.AdamW` (decoupled weight decay), fused when every parameter lives on CUDA;
    `sgd` is `torch.optim.SGD` with momentum (its weight decay is L2).

    The scheduler decays until `scheduler_config.lr_decay_iters` (default `train_iters`), increments
    weight decay over `train_iters`, and defaults both ends of weight decay to
    `optimizer_config.weight_decay`. With WSD and no `lr_wsd_decay_iters`, the final decay lasts 10% of
    the decay span (at least one step). The returned groups already hold step 0's lr and weight decay.
    """
    groups = _param_groups(model_chunks, lr=optimizer_config.lr, min_lr=optimizer_config.min_lr,
                           scale_lr_cond=scale_lr_cond, lr_mult=lr_mult)
    if not groups:
        raise ValueError("model_chunks has no parameters that require grad: nothing to optimize")
    params = [p for group in groups for p in group["params"]]
    lr, wd = optimizer_config.lr, optimizer_config.weight_decay
    if optimizer_config.optimizer == "adam":
        # Fused kernels need every parameter on CUDA; elsewhere let torch pick foreach or a loop.
        fused = True if all(p.device.type == "cuda" for p in params) else None
        betas = (optimizer_config.adam_beta1, optimizer_config.adam_beta2)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=optimizer_config.adam_eps, weight_decay=wd, fused=fused
        )
    elif optimizer_config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=optimizer_config.sgd_momentum, weight_decay=wd)
    else:
        raise ValueError(f"optimizer.optimizer={optimizer_config.optimizer!r} is invalid: choose adam or sgd")
    scheduler = _build_scheduler(optimizer, optimizer_config, scheduler_config, train_iters)
    return optimizer, scheduler


def _grads_by_device(model_chunks: Iterable[nn.Module]) -> dict[torch.device, list[torch.Tensor]]:
    grads: dict[torch.device, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.grad is not None and id(param) not in seen:
                seen.add(id(param))
                grads.setdefault(param.grad.device, []).append(param.grad)
    return grads


def get_grad_norm(model_chunks: Iterable[nn.Module], *, clip_grad: float = 0.0) -> torch.Tensor:
    """Return the global L2 norm of all gradients before clipping; with `clip_grad > 0` also clip them to it.

    The norm is an fp32 0-dim tensor over every parameter's gradient (shared parameters counted once,
    missing gradients skipped); it stays on the device so nothing waits for the host, and the caller
    decides when to read it. Gradients are scaled by `clip_grad / (norm + 1e-6)` clamped to at most 1
    (so a norm under `clip_grad` leaves them unchanged); `clip_grad` 0 or inf leaves them untouched. A
    non-finite norm may leave the gradients NaN or zero: the caller must then skip the optimizer step.
    Sharded (DTensor) gradients give the norm over all shards.
    """
    grads = _grads_by_device(model_chunks)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norm_device = next(iter(grads))
    # fp32 per-tensor norms: squaring bf16/fp16 gradients in their own precision loses the norm's digits.
    norms = []
    for group in grads.values():
        norms.extend(n.to(norm_device) for n in torch._foreach_norm(group, 2.0, dtype=torch.float32))
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if 0 < clip_grad < math.inf:
        scale = torch.clamp(clip_grad / (total + 1e-6), max=1.0)
        for device, group in grads.items():
            torch._foreach_mul_(group, scale.to(device))
    # A DTensor norm holds per-rank partial results; full_tensor() reduces them (a collective, no sync).
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return total


def get_grad_norm_and_clip(model_chunks: Iterable[nn.Module], clip_grad: float) -> torch.Tensor | None:
    """`get_grad_norm(model_chunks, clip_grad=clip_grad)`, but None, touching nothing, when `clip_grad` is 0.

    Megatron's convention: without clipping there is no gradient norm. The training loop measures the
    norm anyway (`get_grad_norm`), to skip non-finite updates, and reports None to callbacks.
    """
    if clip_grad <= 0:
        return None
    return get_grad_norm(model_chunks, clip_grad=clip_grad)
