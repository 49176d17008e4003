"""End-to-end tests of the loop: which events fire, in which order, at which step, with which context."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import megatron.bridge.training.callbacks as callbacks_module
from helpers import make_tiny_config, nan_at_step
from megatron.bridge.training.callbacks import VALID_EVENTS, Callback, CallbackContext, CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.state import GlobalState

OPTIONAL_FIELDS = ("optimizer", "scheduler", "loss_dict", "grad_norm", "skipped_iter", "total_loss_dict")

# The contract's table: the fields each event provides besides state, model and user_state.
PROVIDED = {
    "on_data_init_start": {"optimizer", "scheduler"},
    "on_train_start": {"optimizer", "scheduler"},
    "on_train_step_start": {"optimizer", "scheduler"},
    "on_train_step_end": {"optimizer", "scheduler", "loss_dict", "grad_norm", "skipped_iter"},
    "on_train_end": {"optimizer", "scheduler"},
    "on_eval_start": set(),
    "on_eval_step_start": set(),
    "on_eval_step_end": set(),
    "on_eval_end": {"total_loss_dict"},
    "on_test_start": set(),
    "on_test_step_start": set(),
    "on_test_step_end": set(),
    "on_test_end": {"total_loss_dict"},
    "on_checkpoint_save": {"optimizer"},
}
TRAIN_EVENTS = {"on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end"}
EVAL_EVENTS = {name for name in VALID_EVENTS if name.startswith(("on_eval_", "on_test_"))}


class Recorder(Callback):
    """Overrides all 14 events; records what each fire saw."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.manager: CallbackManager | None = None

    def record(self, event: str, context: CallbackContext) -> None:
        def snapshot(losses):
            if losses is None:
                return None
            return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in losses.items()}

        self.records.append({
            "event": event,
            "step": context.state.train_state.step,
            "training": [m.training for m in context.model],
            "provided": {name for name in OPTIONAL_FIELDS if getattr(context, name) is not None},
            "loss_dict": snapshot(context.loss_dict),
            "grad_norm": context.grad_norm,
            "skipped_iter": context.skipped_iter,
            "total_loss_dict": snapshot(context.total_loss_dict),
            "shared_user_state": self.manager is not None and context.user_state is self.manager.user_state,
            "state": context.state,
            "model": context.model,
            "optimizer": context.optimizer,
            "scheduler": context.scheduler,
        })


for _event in sorted(VALID_EVENTS):
    setattr(Recorder, _event, lambda self, context, _e=_event: self.record(_e, context))


class StepCounterCallback(Callback):
    """The guide's step counter; notes the count whenever an evaluation starts."""

    def __init__(self) -> None:
        self.at_eval_start: list[int] = []

    def on_train_start(self, context):
        context.user_state["callback_step_count"] = 0

    def on_train_step_end(self, context):
        context.user_state["callback_step_count"] += 1

    def on_eval_start(self, context):
        self.at_eval_start.append(context.user_state.get("callback_step_count"))


def run_recorded(cfg, *extra, forward=forward_step):
    recorder = Recorder()
    manager = CallbackManager()
    manager.add(recorder)
    if extra:
        manager.add(list(extra))
    recorder.manager = manager
    pretrain(cfg, forward, callbacks=manager)
    return recorder.records, manager


def events_of(records, *names):
    return [r for r in records if r["event"] in names]


def expected_events(*, train_iters, eval_interval, eval_iters, save, save_interval, skip_train=False):
    """The contract's order of events for a single run from scratch, as (event, step) pairs."""
    events = [("on_data_init_start", 0)]

    def run_pass(kind, step):
        if eval_iters == 0:
            return
        events.append((f"on_{kind}_start", step))
        for _ in range(eval_iters):
            events.extend([(f"on_{kind}_step_start", step), (f"on_{kind}_step_end", step)])
        events.append((f"on_{kind}_end", step))

    step = 0
    if not skip_train:
        events.append(("on_train_start", 0))
        last_saved = None
        for k in range(train_iters):
            events.extend([("on_train_step_start", k), ("on_train_step_end", k)])
            step = k + 1
            if eval_interval and eval_iters > 0 and step % eval_interval == 0:
                run_pass("eval", step)
            if save and save_interval and step % save_interval == 0:
                events.append(("on_checkpoint_save", step))
                last_saved = step
        if save and step != 0 and save_interval != 0 and last_saved != step:
            events.append(("on_checkpoint_save", step))
        events.append(("on_train_end", step))
    run_pass("eval", step)
    run_pass("test", step)
    return events


def test_expected_events_matches_the_contract_example():
    events = expected_events(train_iters=8, eval_interval=5, eval_iters=2, save=True, save_interval=7)
    names = [name for name, _ in events]
    counts = {name: names.count(name) for name in VALID_EVENTS}
    assert counts == {
        "on_data_init_start": 1, "on_train_start": 1, "on_train_step_start": 8, "on_train_step_end": 8,
        "on_eval_start": 2, "on_eval_end": 2, "on_eval_step_start": 4, "on_eval_step_end": 4,
        "on_checkpoint_save": 2, "on_train_end": 1, "on_test_start": 1, "on_test_end": 1,
        "on_test_step_start": 2, "on_test_step_end": 2,
    }
    assert [s for name, s in events if name == "on_checkpoint_save"] == [7, 8]
    assert names[:2] == ["on_data_init_start", "on_train_start"]
    assert names[-1] == "on_test_end"


# ------------------------------------------------------------------------------------------ scenarios

SCENARIOS = {
    "contract_example": dict(train_iters=8, eval_interval=5, eval_iters=2, save=True, save_interval=7),
    "eval_only_after_training": dict(train_iters=6, eval_interval=None, eval_iters=3, save=False,
                                     save_interval=None),
    "eval_iters_0": dict(train_iters=5, eval_interval=2, eval_iters=0, save=False, save_interval=None),
    "final_save_only": dict(train_iters=4, eval_interval=2, eval_iters=1, save=True, save_interval=None),
    "skip_train": dict(train_iters=4, eval_interval=2, eval_iters=2, save=False, save_interval=None,
                       skip_train=True),
}


class ScenarioRuns:
    """Runs each scenario once per module (lazily) and keeps its records, or the error it raised."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: dict[str, tuple] = {}

    def __call__(self, name: str) -> dict:
        if name not in self.results:
            self.results[name] = self._run(name)
        outcome, value = self.results[name]
        if outcome == "error":
            raise value
        return value

    def _run(self, name: str) -> tuple:
        params = SCENARIOS[name]
        workdir = self.root / name
        workdir.mkdir()
        save_dir = workdir / "checkpoints"
        cfg = make_tiny_config(
            train__train_iters=params["train_iters"],
            validation__eval_interval=params["eval_interval"],
            validation__eval_iters=params["eval_iters"],
            validation__skip_train=params.get("skip_train", False),
            checkpoint__save=str(save_dir) if params["save"] else None,
            checkpoint__save_interval=params["save_interval"],
        )
        counter = StepCounterCallback()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(workdir)
            try:
                records, manager = run_recorded(cfg, counter)
            except Exception as err:  # re-raised by every test that uses this scenario
                return "error", err
        return "ok", dict(records=records, manager=manager, cfg=cfg, counter=counter, save_dir=save_dir,
                          params=params, dist_after=dist.is_initialized())


@pytest.fixture(scope="module")
def scenario_runs(tmp_path_factory):
    return ScenarioRuns(tmp_path_factory.mktemp("scenarios"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_event_sequence_with_steps(scenario_runs, name):
    run = scenario_runs(name)
    params = {k: v for k, v in run["params"].items()}
    expected = expected_events(**params)
    actual = [(r["event"], r["step"]) for r in run["records"]]
    assert actual == expected


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_model_is_in_train_mode_at_train_events_and_eval_mode_at_eval_events(scenario_runs, name):
    records = scenario_runs(name)["records"]
    for r in records:
        assert r["training"], r["event"]  # at least one model chunk
        if r["event"] in TRAIN_EVENTS:
            assert all(r["training"]), (r["event"], r["step"])
        if r["event"] in EVAL_EVENTS:
            assert not any(r["training"]), (r["event"], r["step"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_context_fields_per_event(scenario_runs, name):
    for r in scenario_runs(name)["records"]:
        assert r["provided"] == PROVIDED[r["event"]], (r["event"], r["step"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_context_carries_the_same_state_model_and_user_state(scenario_runs, name):
    run = scenario_runs(name)
    records = run["records"]
    assert records
    first = records[0]
    assert isinstance(first["state"], GlobalState)
    assert first["state"].cfg is run["cfg"]
    assert isinstance(first["model"], list) and first["model"]
    assert all(isinstance(chunk, torch.nn.Module) for chunk in first["model"])
    for r in records:
        assert r["shared_user_state"], r["event"]
        assert r["state"] is first["state"], r["event"]
        assert r["model"] is first["model"] or r["model"] == first["model"], r["event"]
    optimizers = {id(r["optimizer"]) for r in records if r["optimizer"] is not None}
    schedulers = {id(r["scheduler"]) for r in records if r["scheduler"] is not None}
    assert len(optimizers) == 1
    assert len(schedulers) == 1
    optimizer = next(r["optimizer"] for r in records if r["optimizer"] is not None)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert all(p.is_floating_point() for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_payload_types(scenario_runs, name):
    records = scenario_runs(name)["records"]
    for r in events_of(records, "on_train_step_end"):
        loss_dict = r["loss_dict"]
        assert type(loss_dict) is dict and list(loss_dict) == ["lm loss"]
        loss = loss_dict["lm loss"]
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()
        assert math.isfinite(loss.item()) and loss.item() > 0
        assert type(r["grad_norm"]) is float
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["skipped_iter"] is False
    for r in events_of(records, "on_eval_end", "on_test_end"):
        total = r["total_loss_dict"]
        assert type(total) is dict and list(total) == ["lm loss"]
        loss = total["lm loss"]
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()
        assert math.isfinite(loss.item()) and loss.item() > 0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_process_group_is_destroyed_after_pretrain(scenario_runs, name):
    assert scenario_runs(name)["dist_after"] is False


def test_contract_example_counts(scenario_runs):
    records = scenario_runs("contract_example")["records"]
    names = [r["event"] for r in records]
    assert {name: names.count(name) for name in VALID_EVENTS} == {
        "on_data_init_start": 1, "on_train_start": 1, "on_train_step_start": 8, "on_train_step_end": 8,
        "on_eval_start": 2, "on_eval_end": 2, "on_eval_step_start": 4, "on_eval_step_end": 4,
        "on_checkpoint_save": 2, "on_train_end": 1, "on_test_start": 1, "on_test_end": 1,
        "on_test_step_start": 2, "on_test_step_end": 2,
    }
    assert names[0] == "on_data_init_start"
    assert names[1] == "on_train_start"
    assert names[-1] == "on_test_end"


def test_contract_example_checkpoint_saves(scenario_runs):
    run = scenario_runs("contract_example")
    records = run["records"]
    names = [r["event"] for r in records]
    saves = events_of(records, "on_checkpoint_save")
    assert [r["step"] for r in saves] == [7, 8]
    assert all(names.index("on_train_end") > i for i, n in enumerate(names) if n == "on_checkpoint_save")
    for r in saves:
        assert r["optimizer"] is not None
        assert r["scheduler"] is None
    # Both checkpoints are completely on disk, with the contract's layout.
    save_dir = run["save_dir"]
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000007", "iter_0000008"]
    assert (save_dir / "iter_0000008" / "run_config.yaml").is_file()
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "8"


def test_contract_example_user_state_step_counter(scenario_runs):
    run = scenario_runs("contract_example")
    assert run["counter"].at_eval_start == [5, 8]
    assert run["manager"].user_state["callback_step_count"] == 8


def test_final_save_only_saves_once_at_the_last_step(scenario_runs):
    run = scenario_runs("final_save_only")
    saves = events_of(run["records"], "on_checkpoint_save")
    assert [r["step"] for r in saves] == [4]
    names = [r["event"] for r in run["records"]]
    assert names.index("on_checkpoint_save") == names.index("on_train_end") - 1
    assert sorted(p.name for p in run["save_dir"].glob("iter_*")) == ["iter_0000004"]


def test_skip_train_only_validates_and_tests(scenario_runs):
    records = scenario_runs("skip_train")["records"]
    names = [r["event"] for r in records]
    assert not TRAIN_EVENTS & set(names)
    assert names[0] == "on_data_init_start"
    assert names.count("on_eval_start") == names.count("on_test_start") == 1
    assert all(r["step"] == 0 for r in records)


def test_skip_train_needs_no_train_iters(chdir):
    # config.validate() accepts train.train_iters=None when validation.skip_train=True.
    cfg = make_tiny_config(train__train_iters=None, validation__skip_train=True, validation__eval_iters=1)
    records, _ = run_recorded(cfg)
    assert [(r["event"], r["step"]) for r in records] == expected_events(
        train_iters=None, eval_interval=None, eval_iters=1, save=False, save_interval=None, skip_train=True)


def test_eval_iters_0_fires_no_eval_or_test_events(scenario_runs):
    names = {r["event"] for r in scenario_runs("eval_iters_0")["records"]}
    assert not names & EVAL_EVENTS
    assert "on_train_end" in names


def test_eval_losses_differ_between_passes(scenario_runs):
    # The in-training pass (after step 5) and the final one (after step 8) evaluate different weights.
    ends = events_of(scenario_runs("contract_example")["records"], "on_eval_end")
    first, last = (r["total_loss_dict"]["lm loss"].item() for r in ends)
    assert first != last


# ------------------------------------------------------------------------------------ loss and forms


def test_loss_falls(chdir):
    cfg = make_tiny_config(train__train_iters=30, validation__eval_iters=0, optimizer__lr=1e-2,
                           optimizer__min_lr=1e-3, scheduler__lr_warmup_iters=0)
    records, _ = run_recorded(cfg)
    losses = [r["loss_dict"]["lm loss"].item() for r in events_of(records, "on_train_step_end")]
    assert len(losses) == 30
    assert losses[0] > math.log(100)  # about log(vocab) at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def _train_losses(forward, **overrides):
    cfg = make_tiny_config(train__train_iters=3, validation__eval_iters=1, **overrides)
    records, _ = run_recorded(cfg, forward=forward)
    return [r["loss_dict"]["lm loss"].item() for r in events_of(records, "on_train_step_end")] + [
        r["total_loss_dict"]["lm loss"].item() for r in events_of(records, "on_eval_end", "on_test_end")
    ]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("reference"))
        return _train_losses(forward_step)


seen_states: list = []


def fs_two(data_iterator, model):
    return forward_step(None, data_iterator, model)


def fs_two_schedule(data_iterator, model, return_schedule_plan=False):
    assert return_schedule_plan is False
    return forward_step(None, data_iterator, model)


def fs_three(state, data_iterator, model):
    seen_states.append(state)
    return forward_step(state, data_iterator, model)


def fs_three_schedule(state, data_iterator, model, return_schedule_plan=False):
    assert return_schedule_plan is False
    seen_states.append(state)
    return forward_step(state, data_iterator, model)


def fs_three_annotated(global_state: GlobalState, data_iterator, model):
    seen_states.append(global_state)
    return forward_step(global_state, data_iterator, model)


class CallableForwardStep:
    def __init__(self):
        self.calls = 0

    def __call__(self, state, data_iterator, model):
        self.calls += 1
        seen_states.append(state)
        return forward_step(state, data_iterator, model)


class CallableTwoArgForwardStep:
    def __call__(self, data_iterator, model):
        return forward_step(None, data_iterator, model)


FORMS = {
    "two_args": (fs_two, False),
    "two_args_schedule_plan": (fs_two_schedule, False),
    "three_args": (fs_three, True),
    "three_args_schedule_plan": (fs_three_schedule, True),
    "annotated_state": (fs_three_annotated, True),
    "callable_object": (CallableForwardStep(), True),
    "callable_object_two_args": (CallableTwoArgForwardStep(), False),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_forward_step_forms_train_identically(chdir, reference_losses, form):
    func, takes_state = FORMS[form]
    seen_states.clear()
    losses = _train_losses(func)
    assert losses == reference_losses
    if takes_state:
        assert seen_states and all(isinstance(s, GlobalState) for s in seen_states)
        assert len({id(s) for s in seen_states}) == 1


def bad_one(batch):
    raise AssertionError("never called")


def bad_four(a, b, c, d):
    raise AssertionError("never called")


@pytest.mark.parametrize("func", [bad_one, bad_four, lambda: None, "forward_step"], ids=["one", "four", "none", "str"])
def test_bad_forward_step_signature_raises_before_training(chdir, func):
    cfg = make_tiny_config(checkpoint__save=str(chdir / "ckpt"), logger__tensorboard_dir=str(chdir / "tb"))
    recorder = Recorder()
    with pytest.raises(ValueError, match="forward_step"):
        pretrain(cfg, func, callbacks=[recorder])
    assert recorder.records == []
    assert not (chdir / "ckpt").exists()
    assert not (chdir / "tb").exists()
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------- zero overhead


@pytest.mark.parametrize(
    "make_callbacks", [lambda: None, lambda: [], CallbackManager, lambda: [Callback()]],
    ids=["none", "empty_list", "empty_manager", "no_overrides"],
)
def test_no_context_is_built_without_callbacks(chdir, monkeypatch, make_callbacks):
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a CallbackContext was built with no callbacks registered")

    monkeypatch.setattr(callbacks_module.CallbackContext, "__init__", forbidden)
    steps = []

    def counting_forward(state, data_iterator, model):
        steps.append(state.train_state.step)
        return forward_step(state, data_iterator, model)

    cfg = make_tiny_config(train__train_iters=2, validation__eval_interval=1, validation__eval_iters=1,
                           checkpoint__save=str(chdir / "ckpt"), checkpoint__save_interval=1)
    pretrain(cfg, counting_forward, callbacks=make_callbacks())
    # 2 train steps, 2 in-training evals, final eval and test: 6 global batches of 2 micro-batches.
    assert len(steps) == 12
    assert not dist.is_initialized()


def test_contexts_are_built_only_for_registered_events(chdir, monkeypatch):
    built = []
    original = callbacks_module.CallbackContext.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(callbacks_module.CallbackContext, "__init__", counting)
    seen = []
    manager = CallbackManager()
    manager.register("on_test_end", lambda context: seen.append(context.total_loss_dict))
    manager.register("on_checkpoint_save", lambda context: seen.append("saved"))  # never saves: no save dir
    cfg = make_tiny_config(train__train_iters=3, validation__eval_interval=1, validation__eval_iters=1)
    pretrain(cfg, forward_step, callbacks=manager)
    assert len(built) == 1
    assert len(seen) == 1 and list(seen[0]) == ["lm loss"]


# ---------------------------------------------------------------------------------------- exceptions


class Boom(Exception):
    pass


@pytest.mark.parametrize(("event", "step"), [
    ("on_data_init_start", 0), ("on_train_step_end", 2), ("on_eval_end", 2), ("on_test_end", 3),
])
def test_callback_exception_propagates_out_of_pretrain(chdir, event, step):
    calls = []

    def boom(context):
        calls.append(context.state.train_state.step)
        if context.state.train_state.step == step:
            raise Boom(f"{event} at {step}")

    recorder = Recorder()
    manager = CallbackManager()
    manager.register(event, boom)
    manager.add(recorder)
    cfg = make_tiny_config(train__train_iters=3, validation__eval_interval=2, validation__eval_iters=1)
    with pytest.raises(Boom, match=f"{event} at {step}"):
        pretrain(cfg, forward_step, callbacks=manager)
    assert not dist.is_initialized()
    names = [r["event"] for r in recorder.records]
    if event != "on_test_end":
        assert "on_train_end" not in names
        assert "on_test_start" not in names
    # Later callbacks of the failing fire were not called, and nothing fired afterwards.
    last = recorder.records[-1] if recorder.records else None
    assert last is None or (last["event"], last["step"]) != (event, step)
    if event == "on_train_step_end":
        assert (last["event"], last["step"]) == ("on_train_step_start", 2)

    if event != "on_train_step_end":
        return
    # The process is clean: a second run works and tears down its group again.
    records, _ = run_recorded(make_tiny_config(train__train_iters=2, validation__eval_iters=1))
    assert [r["event"] for r in records][-1] == "on_test_end"
    assert "on_train_end" in [r["event"] for r in records]
    assert not dist.is_initialized()


def test_exception_in_forward_step_propagates_and_tears_down(chdir):
    def failing(state, data_iterator, model):
        if state.train_state.step == 1:
            raise Boom("forward failed")
        return forward_step(state, data_iterator, model)

    recorder = Recorder()
    with pytest.raises(Boom, match="forward failed"):
        pretrain(make_tiny_config(train__train_iters=3), failing, callbacks=[recorder])
    assert not dist.is_initialized()
    assert "on_train_end" not in [r["event"] for r in recorder.records]


def test_get_rank_works_inside_callbacks(chdir):
    seen = []

    class RankCallback(Callback):
        def on_data_init_start(self, context):
            seen.append((dist.get_rank(), dist.get_world_size()))

        def on_train_step_end(self, context):
            seen.append((dist.get_rank(), dist.get_world_size()))

        def on_test_end(self, context):
            seen.append((dist.get_rank(), dist.get_world_size()))

    assert not dist.is_initialized()
    pretrain(make_tiny_config(train__train_iters=2), forward_step, callbacks=[RankCallback()])
    assert seen == [(0, 1)] * 4
    assert not dist.is_initialized()


def test_pretrain_keeps_a_process_group_it_did_not_create(chdir):
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        records, _ = run_recorded(make_tiny_config(train__train_iters=2))
        assert "on_train_end" in [r["event"] for r in records]
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- non-finite grads


class ParamWatcher(Callback):
    """Notes, per step, whether the parameters changed between step start and step end."""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self.before = None
        self.skipped_samples_at_end = None

    @staticmethod
    def _flat(context):
        return torch.cat([p.detach().reshape(-1).clone() for chunk in context.model for p in chunk.parameters()])

    def on_train_step_start(self, context):
        self.before = self._flat(context)

    def on_train_step_end(self, context):
        self.changed[context.state.train_state.step] = not torch.equal(self.before, self._flat(context))

    def on_train_end(self, context):
        self.skipped_samples_at_end = context.state.train_state.skipped_train_samples


def test_non_finite_gradient_skips_the_update_and_training_continues(chdir):
    watcher = ParamWatcher()
    cfg = make_tiny_config(train__train_iters=5, validation__eval_iters=1, ddp__check_for_nan_in_grad=False)
    records, _ = run_recorded(cfg, watcher, forward=nan_at_step(2))
    ends = events_of(records, "on_train_step_end")
    assert [r["step"] for r in ends] == [0, 1, 2, 3, 4]
    for r in ends:
        if r["step"] == 2:
            assert r["skipped_iter"] is True
            assert type(r["grad_norm"]) is float and math.isnan(r["grad_norm"])
            assert math.isnan(r["loss_dict"]["lm loss"].item())
        else:
            assert r["skipped_iter"] is False
            assert math.isfinite(r["grad_norm"])
            assert math.isfinite(r["loss_dict"]["lm loss"].item())
    assert watcher.changed == {0: True, 1: True, 2: False, 3: True, 4: True}
    assert watcher.skipped_samples_at_end == cfg.train.global_batch_size
    names = [r["event"] for r in records]
    assert "on_train_end" in names and names[-1] == "on_test_end"
    for r in events_of(records, "on_eval_end", "on_test_end"):
        assert math.isfinite(r["total_loss_dict"]["lm loss"].item())


def test_check_for_nan_in_grad_raises_naming_the_iteration(chdir):
    recorder = Recorder()
    cfg = make_tiny_config(train__train_iters=5, ddp__check_for_nan_in_grad=True)
    with pytest.raises(Exception, match=r"iteration 3\b"):
        pretrain(cfg, nan_at_step(2), callbacks=[recorder])
    assert not dist.is_initialized()
    names = [(r["event"], r["step"]) for r in recorder.records]
    # The bad step ends (its update skipped, as its callback sees), then the run stops before the next.
    bad_step_end = next(r for r in recorder.records if (r["event"], r["step"]) == ("on_train_step_end", 2))
    assert bad_step_end["skipped_iter"] is True
    assert ("on_train_step_start", 3) not in names
    assert "on_train_end" not in [n for n, _ in names]


def test_grad_norm_is_none_without_clipping(chdir):
    cfg = make_tiny_config(train__train_iters=3, validation__eval_iters=0, optimizer__clip_grad=0.0)
    watcher = ParamWatcher()
    records, _ = run_recorded(cfg, watcher)
    ends = events_of(records, "on_train_step_end")
    assert len(ends) == 3
    for r in ends:
        assert r["grad_norm"] is None
        assert r["skipped_iter"] is False
        assert r["provided"] == {"optimizer", "scheduler", "loss_dict", "skipped_iter"}
    assert watcher.changed == {0: True, 1: True, 2: True}


# ---------------------------------------------------------------------------------------- tensorboard


def test_tensorboard_event_files_hold_train_and_validation_loss(chdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = chdir / "tb"
    cfg = make_tiny_config(train__train_iters=4, validation__eval_interval=2, validation__eval_iters=1,
                           logger__log_interval=1, logger__tensorboard_dir=str(tb_dir))
    records, _ = run_recorded(cfg)
    event_files = [p for p in tb_dir.rglob("*") if p.name.startswith("events.out.tfevents")]
    assert event_files
    accumulator = EventAccumulator(str(tb_dir))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "lm loss" in tags
    train = accumulator.Scalars("lm loss")
    assert [e.step for e in train] == [1, 2, 3, 4]
    seen = [r["loss_dict"]["lm loss"].item() for r in events_of(records, "on_train_step_end")]
    assert [e.value for e in train] == pytest.approx(seen, rel=1e-5)

    # The pass after training has tags of its own: two points at step 4 would be indistinguishable.
    validation_tags = sorted(t for t in tags if "lm loss" in t and "validation" in t and "ppl" not in t)
    assert validation_tags == ["lm loss validation", "lm loss validation final", "lm loss validation final vs samples",
                               "lm loss validation vs samples"]
    in_training, final = accumulator.Scalars("lm loss validation"), accumulator.Scalars("lm loss validation final")
    eval_ends = events_of(records, "on_eval_end")
    assert [e.step for e in in_training + final] == [r["step"] for r in eval_ends] == [2, 4, 4]
    assert [e.value for e in in_training + final] == pytest.approx(
        [r["total_loss_dict"]["lm loss"].item() for r in eval_ends], rel=1e-5)
