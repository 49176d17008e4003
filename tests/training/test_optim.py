"""Tests for the optimizer setup, the lr / weight-decay scheduler and gradient clipping."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from megatron.bridge.training.config import OptimizerConfig, SchedulerConfig
from megatron.bridge.training.optim import (
    OptimizerParamScheduler,
    get_canonical_lr_for_logging,
    get_grad_norm,
    get_grad_norm_and_clip,
    setup_optimizer,
)

# A schedule with a 10-step warm-up from 0.1 to 1.0, then decay to 0.2 over steps 10..110.
SCHEDULE = dict(init_lr=0.1, max_lr=1.0, min_lr=0.2, lr_warmup_steps=10, lr_decay_steps=110)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embedding.weight


def dummy_optimizer(*groups: dict) -> torch.optim.Optimizer:
    groups = groups or ({"wd_mult": 1.0},)
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], **g} for g in groups], lr=0.0)


def make_scheduler(optimizer=None, **overrides) -> OptimizerParamScheduler:
    kwargs = dict(SCHEDULE, lr_decay_style="linear", start_wd=0.01, end_wd=0.01, wd_incr_steps=100,
                  wd_incr_style="constant")
    kwargs.update(overrides)
    return OptimizerParamScheduler(optimizer=optimizer or dummy_optimizer(), **kwargs)


def lr_at(scheduler: OptimizerParamScheduler, step: int) -> float:
    scheduler.step(increment=step - scheduler.num_steps)
    lr = scheduler.get_lr()
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    return lr


# --- learning rate --------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "WSD"])
def test_warmup_is_linear_from_init_lr(style):
    scheduler = make_scheduler(lr_decay_style=style)
    assert scheduler.num_steps == 0
    # The constructor already applied step 0, so the first optimizer step uses init_lr.
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert lr_at(scheduler, 5) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert lr_at(scheduler, 10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("constant", {35: 1.0, 60: 1.0, 110: 1.0, 500: 1.0}),
        ("linear", {35: 0.2 + 0.8 * 0.75, 60: 0.6, 110: 0.2, 111: 0.2, 500: 0.2}),
        ("cosine", {35: 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), 60: 0.6, 110: 0.2, 500: 0.2}),
    ],
)
def test_decay_styles(style, expected):
    scheduler = make_scheduler(lr_decay_style=style)
    for step, lr in expected.items():
        assert lr_at(scheduler, step) == pytest.approx(lr), step


@pytest.mark.parametrize(
    ("wsd_style", "coeff_at_half"),
    [("linear", 0.5), ("cosine", 0.5), ("exponential", math.sqrt(2) - 1), ("minus_sqrt", 1 - math.sqrt(0.5))],
)
def test_wsd_is_stable_then_decays(wsd_style, coeff_at_half):
    scheduler = make_scheduler(lr_decay_style="WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
    assert lr_at(scheduler, 50) == pytest.approx(1.0)
    assert lr_at(scheduler, 90) == pytest.approx(1.0)
    assert lr_at(scheduler, 100) == pytest.approx(0.2 + 0.8 * coeff_at_half)
    assert lr_at(scheduler, 110) == pytest.approx(0.2)
    assert lr_at(scheduler, 300) == pytest.approx(0.2)


def test_wsd_default_decay_is_a_tenth_of_the_decay_span():
    scheduler = make_scheduler(lr_decay_style="WSD", lr_wsd_decay_style="linear")
    assert scheduler.wsd_decay_steps == 10
    assert lr_at(scheduler, 100) == pytest.approx(1.0)
    assert lr_at(scheduler, 105) == pytest.approx(0.6)


def test_a_group_follows_its_own_max_and_min_lr_and_lr_mult_is_not_applied_again():
    # Megatron-LM's semantics: lr_mult is folded into a group's max_lr/min_lr when the groups are
    # built; at step time the scheduler reads those and never multiplies by lr_mult.
    optimizer = dummy_optimizer({"wd_mult": 1.0}, {"wd_mult": 1.0, "lr_mult": 0.5, "max_lr": 0.5, "min_lr": 0.1},
                                {"wd_mult": 1.0, "lr_mult": 0.5})
    scheduler = make_scheduler(optimizer, lr_decay_style="linear")
    scheduler.step(increment=60)  # halfway through the decay
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.6, 0.3, 0.6])


def test_lr_mult_from_setup_optimizer_gives_megatron_lms_rates():
    model = Tiny()
    cfg = OptimizerConfig(lr=0.004, min_lr=0.0004)
    sched = SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=10)
    optimizer, scheduler = setup_optimizer(cfg, sched, [model], train_iters=100, lr_mult=2.0,
                                           scale_lr_cond=lambda name, param: name.startswith("linear."))
    groups = {(g["wd_mult"], g["lr_mult"]): g for g in optimizer.param_groups}
    assert set(groups) == {(1.0, 2.0), (0.0, 2.0), (0.0, 1.0)}  # norm params are not scaled
    assert groups[(1.0, 2.0)]["params"] == [model.linear.weight]
    assert (groups[(1.0, 2.0)]["max_lr"], groups[(1.0, 2.0)]["min_lr"]) == (0.008, 0.0008)
    assert [g["default_config"] for g in optimizer.param_groups] == [True, False, False]
    scheduler.step(increment=40)
    # Megatron-LM at step 40 of a cosine decay over steps 10..100, each group from its own max_lr/min_lr.
    coeff = 0.5 * (math.cos(math.pi * (30 / 90)) + 1.0)
    assert groups[(1.0, 2.0)]["lr"] == 0.0008 + coeff * (0.008 - 0.0008)
    assert groups[(0.0, 1.0)]["lr"] == 0.0004 + coeff * (0.004 - 0.0004)


def test_get_canonical_lr_for_logging_is_the_first_default_groups_rate():
    optimizer = dummy_optimizer({"default_config": False, "max_lr": 0.5}, {"default_config": True},
                                {"default_config": True, "max_lr": 0.25})
    make_scheduler(optimizer, lr_decay_style="constant").step(increment=20)
    assert get_canonical_lr_for_logging(optimizer.param_groups) == 1.0
    assert get_canonical_lr_for_logging(dummy_optimizer({"wd_mult": 1.0}).param_groups) is None
    optimizer, _ = setup_optimizer(OptimizerConfig(lr=0.3), SchedulerConfig(), [Tiny()], train_iters=10)
    assert get_canonical_lr_for_logging(optimizer.param_groups) == optimizer.param_groups[0]["lr"]


def test_a_group_follows_its_own_start_and_end_weight_decay():
    optimizer = dummy_optimizer({"wd_mult": 1.0}, {"wd_mult": 0.5, "start_wd": 0.2, "end_wd": 0.4})
    scheduler = make_scheduler(optimizer, start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    scheduler.step(increment=50)
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.5 * 0.3])


def test_invalid_schedule_raises():
    with pytest.raises(ValueError, match="lr_decay_style"):
        make_scheduler(lr_decay_style="step")
    with pytest.raises(ValueError, match="min_lr"):
        make_scheduler(min_lr=2.0)
    with pytest.raises(ValueError, match="end_wd"):
        make_scheduler(start_wd=0.0, end_wd=0.1, wd_incr_style="constant")


# --- weight decay ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("linear", {0: 0.0, 25: 0.025, 50: 0.05, 100: 0.1, 150: 0.1}),
        ("cosine", {0: 0.0, 25: 0.05 * (1 - math.sqrt(0.5)), 50: 0.05, 100: 0.1, 150: 0.1}),
    ],
)
def test_weight_decay_increment(style, expected):
    optimizer = dummy_optimizer({"wd_mult": 1.0}, {"wd_mult": 0.0})
    scheduler = make_scheduler(optimizer, start_wd=0.0, end_wd=0.1, wd_incr_style=style)
    for step, wd in expected.items():
        scheduler.step(increment=step - scheduler.num_steps)
        assert scheduler.get_wd() == pytest.approx(wd), step
        assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([wd, 0.0])


def test_constant_weight_decay():
    scheduler = make_scheduler(start_wd=0.03, end_wd=0.03)
    for step in (0, 50, 200):
        scheduler.step(increment=step - scheduler.num_steps)
        assert scheduler.get_wd() == pytest.approx(0.03)


# --- setup_optimizer ------------------------------------------------------------------------------

def test_param_groups_split_and_dedupe_tied_params():
    tiny, tied = Tiny(), Tied()
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    optimizer, _ = setup_optimizer(OptimizerConfig(), SchedulerConfig(), [tiny, tied, tied, frozen],
                                   train_iters=10)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([tiny.linear.weight, tied.embedding.weight])
    assert len(decay["params"]) == 2
    assert ids(no_decay["params"]) == ids([tiny.linear.bias, tiny.norm.weight, tiny.norm.bias])
    assert len(no_decay["params"]) == 3


def test_adam_hyperparameters_and_scheduler_defaults():
    opt_cfg = OptimizerConfig(lr=0.5, min_lr=0.1, weight_decay=0.2, adam_beta1=0.8, adam_beta2=0.95,
                              adam_eps=1e-6)
    sched_cfg = SchedulerConfig(lr_decay_style="WSD", lr_warmup_iters=4, lr_warmup_init=0.05)
    optimizer, scheduler = setup_optimizer(opt_cfg, sched_cfg, [Tiny()], train_iters=104)
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-6
    assert scheduler.lr_decay_steps == 104 and scheduler.wd_incr_steps == 104
    assert scheduler.wsd_decay_steps == 10
    assert scheduler.start_wd == scheduler.end_wd == 0.2
    assert (scheduler.init_lr, scheduler.max_lr, scheduler.min_lr) == (0.05, 0.5, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.05])


def test_sgd():
    cfg = OptimizerConfig(optimizer="sgd", sgd_momentum=0.7)
    optimizer, _ = setup_optimizer(cfg, SchedulerConfig(), [Tiny()], train_iters=10)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.7


def test_weight_decay_applied_as_wd_times_wd_mult():
    model = Tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.5)
    optimizer, scheduler = setup_optimizer(cfg, SchedulerConfig(lr_decay_style="constant"), [model],
                                           train_iters=10)
    scheduler.step()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    # With zero gradients Adam's update is zero, so only decoupled weight decay moves the weights.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model.linear.weight, before["linear.weight"] * (1 - 0.1 * 0.5))
    for name in ("linear.bias", "norm.weight", "norm.bias"):
        torch.testing.assert_close(model.get_parameter(name), before[name])


# --- checkpointing --------------------------------------------------------------------------------

def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip():
    source = make_scheduler(lr_decay_style="cosine", start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    source.step(increment=37)
    state = source.state_dict()
    assert all(isinstance(v, (int, float, str)) for v in state.values())
    target = make_scheduler(lr_decay_style="cosine", start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    target.load_state_dict(roundtrip(state))
    assert target.num_steps == 37
    assert target.get_lr() == pytest.approx(source.get_lr())
    assert target.optimizer.param_groups[0]["lr"] == pytest.approx(source.get_lr())
    assert target.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.037)


def megatron_lm_state_dict(**changes) -> dict:
    """What Megatron-LM's `OptimizerParamScheduler.state_dict()` returns: these ten keys, these types."""
    state = {"max_lr": 1.0, "lr_warmup_steps": 10, "num_steps": 35, "lr_decay_style": "cosine",
             "lr_decay_steps": 110, "min_lr": 0.2, "start_wd": 0.0, "end_wd": 0.1, "wd_incr_style": "linear",
             "wd_incr_steps": 100}
    return {**state, **changes}


@pytest.mark.parametrize("legacy", [False, True], ids=["current-keys", "legacy-keys"])
def test_a_megatron_lm_scheduler_state_dict_loads(legacy):
    state = megatron_lm_state_dict()
    if legacy:  # the names Megatron-LM's load_state_dict still accepts from older checkpoints
        renames = {"max_lr": "start_lr", "lr_warmup_steps": "warmup_iter", "lr_decay_steps": "end_iter",
                   "lr_decay_style": "decay_style", "num_steps": "num_iters"}
        state = {renames.get(key, key): value for key, value in state.items()}
    target = make_scheduler(lr_decay_style="linear", max_lr=3.0, min_lr=0.0, lr_decay_steps=500)
    target.load_state_dict(roundtrip(state))
    assert target.num_steps == 35
    assert (target.max_lr, target.min_lr, target.lr_decay_steps, target.lr_decay_style) == (1.0, 0.2, 110, "cosine")
    # Megatron-LM's formulas at step 35: cosine from step 10 to 110; linear weight decay over 100 steps.
    expected_lr = 0.2 + 0.5 * (math.cos(math.pi * 25 / 100) + 1.0) * 0.8
    assert target.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)
    assert target.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.035)
    assert target.init_lr == 0.1  # a field Megatron-LM does not save keeps this run's value


def test_a_scheduler_state_dict_without_a_step_count_names_it():
    with pytest.raises(KeyError, match="num_steps"):
        make_scheduler().load_state_dict({"max_lr": 1.0})


@pytest.mark.parametrize("override", [False, True])
def test_override_opt_param_scheduler(override):
    source = make_scheduler(lr_decay_style="constant")
    source.step(increment=30)
    target = make_scheduler(lr_decay_style="constant", max_lr=2.0, override_opt_param_scheduler=override)
    target.load_state_dict(source.state_dict())
    assert target.num_steps == 30
    expected = 2.0 if override else 1.0
    assert target.max_lr == expected
    assert target.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


# --- gradient norm and clipping -------------------------------------------------------------------

def tiny_with_grads() -> Tiny:
    model = Tiny()
    model.linear.weight.grad = torch.ones(3, 4)  # sum of squares 12
    model.linear.bias.grad = torch.full((3,), 2.0)  # sum of squares 12
    model.norm.weight.grad = None
    model.norm.bias.grad = torch.zeros(3)
    return model


def grad_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_grad_norm_and_clip():
    model = tiny_with_grads()
    # The same chunk twice: its gradients must still count once.
    norm = get_grad_norm_and_clip([model, model], clip_grad=1.0)
    assert norm.dim() == 0 and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(math.sqrt(24))
    assert grad_norm(model) == pytest.approx(1.0, rel=1e-5)
    scale = 1.0 / (math.sqrt(24) + 1e-6)
    torch.testing.assert_close(model.linear.weight.grad, torch.full((3, 4), scale))
    torch.testing.assert_close(model.linear.bias.grad, torch.full((3,), 2.0 * scale))


def test_grad_norm_below_clip_leaves_grads_alone():
    model = tiny_with_grads()
    norm = get_grad_norm_and_clip([model], clip_grad=100.0)
    assert norm.item() == pytest.approx(math.sqrt(24))
    torch.testing.assert_close(model.linear.weight.grad, torch.ones(3, 4))


def test_clip_grad_zero_returns_none():
    model = tiny_with_grads()
    assert get_grad_norm_and_clip([model], clip_grad=0.0) is None
    torch.testing.assert_close(model.linear.weight.grad, torch.ones(3, 4))


@pytest.mark.parametrize("clip_grad", [0.0, math.inf], ids=["no_clipping", "infinite"])
def test_get_grad_norm_measures_without_clipping(clip_grad):
    model = tiny_with_grads()
    norm = get_grad_norm([model, model], clip_grad=clip_grad)
    assert norm.dim() == 0 and norm.item() == pytest.approx(math.sqrt(24))
    torch.testing.assert_close(model.linear.weight.grad, torch.ones(3, 4), rtol=0, atol=0)


def test_get_grad_norm_without_clipping_still_sees_a_nan():
    model = tiny_with_grads()
    model.linear.weight.grad[1, 2] = float("inf")
    assert get_grad_norm([model]).item() == math.inf


def test_grad_norm_is_fp32_for_bf16_grads():
    param = nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    param.grad = torch.ones(300, dtype=torch.bfloat16)
    model = nn.Module()
    model.param = param
    norm = get_grad_norm_and_clip([model], clip_grad=1e9)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(math.sqrt(300), rel=1e-6)


def test_non_finite_norm_is_returned_not_raised():
    model = tiny_with_grads()
    model.linear.bias.grad[0] = float("nan")
    norm = get_grad_norm_and_clip([model], clip_grad=1.0)
    assert not torch.isfinite(norm)


def test_no_grads_gives_zero_norm():
    assert get_grad_norm_and_clip([Tiny()], clip_grad=1.0).item() == 0.0
