"""Unit tests of the callback module: every behaviour the API contract pins down."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import megatron.bridge.training.callbacks as callbacks_module
from megatron.bridge.training.callbacks import (
    VALID_EVENTS,
    Callback,
    CallbackContext,
    CallbackManager,
    normalize_callbacks,
    should_fire,
)

EVENTS = (
    "on_data_init_start",
    "on_train_start",
    "on_train_step_start",
    "on_train_step_end",
    "on_train_end",
    "on_eval_start",
    "on_eval_step_start",
    "on_eval_step_end",
    "on_eval_end",
    "on_test_start",
    "on_test_step_start",
    "on_test_step_end",
    "on_test_end",
    "on_checkpoint_save",
)

OPTIONAL_FIELDS = ("optimizer", "scheduler", "loss_dict", "grad_norm", "skipped_iter", "total_loss_dict")

TRAINING_DIR = Path(callbacks_module.__file__).resolve().parent

# Where each event fires, per the issue (and the callbacks.py module docstring).
FIRE_SITES = {
    "on_data_init_start": "setup.py",
    **{name: "train.py" for name in EVENTS if name.startswith("on_train_")},
    **{name: "eval.py" for name in EVENTS if name.startswith(("on_eval_", "on_test_"))},
    "on_checkpoint_save": "checkpointing.py",
}


def make_context(**fields):
    return CallbackContext(state=object(), model=[], **fields)


# --------------------------------------------------------------------------------------------- events


def test_valid_events_is_a_frozenset_of_exactly_the_14_names():
    assert type(VALID_EVENTS) is frozenset
    assert VALID_EVENTS == frozenset(EVENTS)
    assert len(VALID_EVENTS) == 14


# ------------------------------------------------------------------------------------------- Callback


@pytest.mark.parametrize("event", EVENTS)
def test_callback_has_a_no_op_method_per_event_taking_self_and_context(event):
    method = getattr(Callback, event)
    assert callable(method)
    assert list(inspect.signature(method).parameters) == ["self", "context"]
    assert getattr(Callback(), event)(make_context()) is None


def test_callback_has_no_other_public_event_methods():
    public = {name for name in vars(Callback) if name.startswith("on_")}
    assert public == VALID_EVENTS


# ------------------------------------------------------------------------------------ CallbackContext


def test_context_is_a_dataclass_requiring_state_and_model():
    assert dataclasses.is_dataclass(CallbackContext)
    with pytest.raises(TypeError):
        CallbackContext()
    with pytest.raises(TypeError):
        CallbackContext(state=object())
    with pytest.raises(TypeError):
        CallbackContext(model=[])


def test_context_defaults():
    state, model = object(), [object()]
    context = CallbackContext(state=state, model=model)
    assert context.state is state
    assert context.model is model
    assert context.user_state == {}
    assert type(context.user_state) is dict
    for name in OPTIONAL_FIELDS:
        assert getattr(context, name) is None, name


def test_context_user_state_is_a_fresh_dict_per_instance():
    first, second = make_context(), make_context()
    assert first.user_state is not second.user_state
    first.user_state["x"] = 1
    assert second.user_state == {}
    assert make_context().user_state == {}


def test_context_fields_are_the_contract_ones():
    names = [f.name for f in dataclasses.fields(CallbackContext)]
    assert set(names) == {"state", "model", "user_state", *OPTIONAL_FIELDS}
    assert names[:2] == ["state", "model"]


def test_context_keeps_given_fields():
    user_state = {"a": 1}
    context = make_context(user_state=user_state, optimizer="opt", grad_norm=1.5, skipped_iter=False)
    assert context.user_state is user_state
    assert context.optimizer == "opt"
    assert context.grad_norm == 1.5
    assert context.skipped_iter is False
    assert context.scheduler is None


# ---------------------------------------------------------------------------------------------- add()


class OnlyTrainStart(Callback):
    def __init__(self, log=None, tag="a"):
        self.log = [] if log is None else log
        self.tag = tag

    def on_train_start(self, context):
        self.log.append((self.tag, "on_train_start"))


class AlsoStepEnd(OnlyTrainStart):
    def on_train_step_end(self, context):
        self.log.append((self.tag, "on_train_step_end"))


class Everything(Callback):
    pass


for _event in EVENTS:
    setattr(Everything, _event, lambda self, context, _e=_event: self.seen.append(_e))


def test_add_registers_only_overridden_methods():
    manager = CallbackManager()
    callback = OnlyTrainStart()
    manager.add(callback)
    assert manager.has_callbacks("on_train_start") is True
    assert manager.list_callbacks("on_train_start") == [callback.on_train_start]
    for event in VALID_EVENTS - {"on_train_start"}:
        assert manager.has_callbacks(event) is False, event
        assert manager.list_callbacks(event) == [], event


def test_add_a_plain_callback_registers_nothing():
    manager = CallbackManager()
    manager.add(Callback())
    assert not any(manager.has_callbacks(event) for event in EVENTS)


def test_add_counts_overrides_inherited_from_an_intermediate_subclass():
    manager = CallbackManager()
    callback = AlsoStepEnd()
    manager.add(callback)
    registered = {event for event in EVENTS if manager.has_callbacks(event)}
    assert registered == {"on_train_start", "on_train_step_end"}
    manager.fire("on_train_start", make_context())
    manager.fire("on_train_step_end", make_context())
    assert callback.log == [("a", "on_train_start"), ("a", "on_train_step_end")]


def test_add_registers_every_overridden_event():
    manager = CallbackManager()
    callback = Everything()
    callback.seen = []
    manager.add(callback)
    for event in EVENTS:
        assert manager.list_callbacks(event) == [getattr(callback, event)]
        manager.fire(event, make_context())
    assert callback.seen == list(EVENTS)


def test_add_accepts_a_list_and_keeps_its_order():
    log = []
    manager = CallbackManager()
    manager.add([OnlyTrainStart(log, "a"), OnlyTrainStart(log, "b"), OnlyTrainStart(log, "c")])
    manager.fire("on_train_start", make_context())
    assert log == [("a", "on_train_start"), ("b", "on_train_start"), ("c", "on_train_start")]


# ----------------------------------------------------------------------------------------- register()


def test_register_and_fire_passes_the_context():
    received = []
    manager = CallbackManager()
    manager.register("on_eval_end", received.append)
    context = make_context(total_loss_dict={"lm loss": 1.0})
    manager.fire("on_eval_end", context)
    assert received == [context]
    assert received[0] is context


@pytest.mark.parametrize("name", ["on_train_begin", "train_start", "", "ON_TRAIN_START", "on_step_end"])
def test_register_unknown_event_raises_listing_valid_names(name):
    manager = CallbackManager()
    with pytest.raises(ValueError, match=r"^Unknown event") as info:
        manager.register(name, lambda context: None)
    message = str(info.value)
    for event in EVENTS:
        assert event in message
    assert not any(manager.has_callbacks(event) for event in EVENTS)


# --------------------------------------------------------------------------------------------- fire()


def test_fire_order_is_registration_order_across_add_and_register():
    log = []
    manager = CallbackManager()
    manager.register("on_train_start", lambda context: log.append("fn1"))
    manager.add(OnlyTrainStart(log, "obj1"))
    manager.register("on_train_start", lambda context: log.append("fn2"))
    manager.add([OnlyTrainStart(log, "obj2"), AlsoStepEnd(log, "obj3")])
    manager.register("on_train_start", lambda context: log.append("fn3"))
    manager.fire("on_train_start", make_context())
    assert log == [
        "fn1", ("obj1", "on_train_start"), "fn2", ("obj2", "on_train_start"), ("obj3", "on_train_start"), "fn3",
    ]


def test_fire_only_calls_the_fired_event():
    log = []
    manager = CallbackManager()
    manager.register("on_eval_start", lambda context: log.append("eval"))
    manager.register("on_test_start", lambda context: log.append("test"))
    manager.fire("on_test_start", make_context())
    assert log == ["test"]


def test_fire_with_no_callbacks_does_nothing():
    CallbackManager().fire("on_train_start", make_context())


def test_fire_exception_propagates_at_once():
    log = []

    def boom(context):
        log.append("boom")
        raise KeyError("from callback")

    manager = CallbackManager()
    manager.register("on_train_step_end", lambda context: log.append("first"))
    manager.register("on_train_step_end", boom)
    manager.register("on_train_step_end", lambda context: log.append("after"))
    with pytest.raises(KeyError, match="from callback"):
        manager.fire("on_train_step_end", make_context())
    assert log == ["first", "boom"]
    # Nothing was unregistered: the next fire calls everyone again (and fails again).
    with pytest.raises(KeyError):
        manager.fire("on_train_step_end", make_context())
    assert log == ["first", "boom", "first", "boom"]


def test_fire_exception_from_a_class_callback_propagates():
    class Failing(Callback):
        def on_eval_end(self, context):
            raise RuntimeError("bad callback")

    log = []
    manager = CallbackManager()
    manager.add(Failing())
    manager.register("on_eval_end", lambda context: log.append("later"))
    with pytest.raises(RuntimeError, match="bad callback"):
        manager.fire("on_eval_end", make_context())
    assert log == []


# ------------------------------------------------------------------------------------- introspection


@pytest.mark.parametrize("name", ["on_train_begin", "", "nonsense", "on_train_start "])
def test_has_callbacks_is_false_for_unknown_names(name):
    manager = CallbackManager()
    manager.register("on_train_start", lambda context: None)
    assert manager.has_callbacks(name) is False


def test_has_callbacks_true_only_after_registration():
    manager = CallbackManager()
    assert manager.has_callbacks("on_train_start") is False
    manager.register("on_train_start", lambda context: None)
    assert manager.has_callbacks("on_train_start") is True
    assert manager.has_callbacks("on_train_end") is False


def test_list_callbacks_returns_a_new_list_in_order():
    def f1(context):
        pass

    def f2(context):
        pass

    callback = OnlyTrainStart()
    manager = CallbackManager()
    manager.register("on_train_start", f1)
    manager.add(callback)
    manager.register("on_train_start", f2)
    listed = manager.list_callbacks("on_train_start")
    assert type(listed) is list
    assert listed == [f1, callback.on_train_start, f2]
    assert manager.list_callbacks("on_train_start") is not listed

    listed.clear()
    listed.append(print)
    assert manager.list_callbacks("on_train_start") == [f1, callback.on_train_start, f2]
    assert manager.list_callbacks("on_train_end") == []
    empty = manager.list_callbacks("on_train_end")
    empty.append(f1)
    assert manager.has_callbacks("on_train_end") is False


@pytest.mark.parametrize("name", ["on_train_begin", "", "on_test"])
def test_list_callbacks_unknown_event_raises(name):
    with pytest.raises(ValueError, match=r"^Unknown event"):
        CallbackManager().list_callbacks(name)


def test_events_is_the_frozenset_of_valid_names():
    manager = CallbackManager()
    assert type(manager.events) is frozenset
    assert manager.events == VALID_EVENTS


def test_user_state_is_a_dict_owned_by_the_manager():
    manager = CallbackManager()
    assert type(manager.user_state) is dict
    assert manager.user_state == {}
    assert manager.user_state is manager.user_state
    manager.user_state["count"] = 3
    assert manager.user_state == {"count": 3}
    assert CallbackManager().user_state == {}
    assert CallbackManager().user_state is not manager.user_state


def test_user_state_is_shared_through_contexts_built_with_it():
    manager = CallbackManager()

    def writer(context):
        context.user_state["seen"] = context.user_state.get("seen", 0) + 1

    manager.register("on_train_step_end", writer)
    for _ in range(3):
        manager.fire("on_train_step_end", make_context(user_state=manager.user_state))
    assert manager.user_state == {"seen": 3}


# ------------------------------------------------------------------------------- normalize_callbacks


def test_normalize_none_is_none():
    assert normalize_callbacks(None) is None


def test_normalize_manager_is_the_same_object():
    manager = CallbackManager()
    manager.register("on_train_start", lambda context: None)
    assert normalize_callbacks(manager) is manager
    empty = CallbackManager()
    assert normalize_callbacks(empty) is empty


def test_normalize_list_gives_a_new_manager_with_add_applied():
    log = []
    first, second = OnlyTrainStart(log, "a"), AlsoStepEnd(log, "b")
    manager = normalize_callbacks([first, second])
    assert isinstance(manager, CallbackManager)
    assert manager.list_callbacks("on_train_start") == [first.on_train_start, second.on_train_start]
    assert manager.list_callbacks("on_train_step_end") == [second.on_train_step_end]
    assert manager.has_callbacks("on_train_end") is False
    assert normalize_callbacks([first, second]) is not manager


def test_normalize_single_callback():
    callback = AlsoStepEnd()
    manager = normalize_callbacks(callback)
    assert isinstance(manager, CallbackManager)
    assert {event for event in EVENTS if manager.has_callbacks(event)} == {"on_train_start", "on_train_step_end"}


def test_normalize_empty_list_gives_an_empty_manager():
    manager = normalize_callbacks([])
    assert isinstance(manager, CallbackManager)
    assert not any(manager.has_callbacks(event) for event in EVENTS)
    assert manager.user_state == {}


def test_normalize_accepts_a_tuple_and_an_object_with_event_methods():
    class DuckTyped:  # not a Callback, but add() registers its event methods
        def on_train_start(self, context):
            pass

    duck = DuckTyped()
    manager = normalize_callbacks((AlsoStepEnd(), duck))
    assert manager.list_callbacks("on_train_start")[-1] == duck.on_train_start
    assert normalize_callbacks(duck).has_callbacks("on_train_start")


def _a_function(context):
    pass


# (id, what pretrain(callbacks=...) received, fragments the message must contain)
NOT_CALLBACKS = [
    ("function", _a_function, ["callbacks=<function _a_function", "CallbackManager.register(event, fn)"]),
    ("lambda_in_a_list", [lambda ctx: None], ["callbacks[0]=<function", "CallbackManager.register(event, fn)"]),
    ("string", "oops", ["callbacks='oops'", "type str"]),
    ("dict", {"on_train_start": _a_function}, ["callbacks={'on_train_start'", "type dict"]),
    ("class_not_instance", AlsoStepEnd, ["a class, not an instance", "AlsoStepEnd()"]),
    ("none_in_a_list", [AlsoStepEnd(), None], ["callbacks[1]=None"]),
]


@pytest.mark.parametrize(("value", "fragments"), [c[1:] for c in NOT_CALLBACKS], ids=[c[0] for c in NOT_CALLBACKS])
def test_normalize_refuses_what_it_cannot_register(value, fragments):
    with pytest.raises(ValueError) as info:
        normalize_callbacks(value)
    message = str(info.value)
    for fragment in fragments + ["a CallbackManager, a Callback, a list of Callbacks, or None"]:
        assert fragment in message, (fragment, message)


def test_pretrain_refuses_a_function_as_callbacks_before_any_work(chdir):
    import torch.distributed as dist

    from helpers import make_tiny_config
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    with pytest.raises(ValueError, match=r"^callbacks=<function _a_function .*CallbackManager\.register"):
        pretrain(make_tiny_config(), forward_step, callbacks=_a_function)
    assert not dist.is_initialized() and list(chdir.iterdir()) == []


# --------------------------------------------------------------------------------------- should_fire


def test_should_fire_is_exactly_true_or_false():
    manager = CallbackManager()
    manager.register("on_train_start", lambda context: None)
    assert should_fire(None, "on_train_start") is False
    assert should_fire(None, "nonsense") is False
    assert should_fire(CallbackManager(), "on_train_start") is False
    assert should_fire(manager, "nonsense") is False
    assert should_fire(manager, "on_train_end") is False
    assert should_fire(manager, "on_train_start") is True


@pytest.mark.parametrize("event", EVENTS)
def test_should_fire_for_every_event(event):
    manager = CallbackManager()
    assert should_fire(manager, event) is False
    manager.register(event, lambda context: None)
    assert should_fire(manager, event) is True
    assert should_fire(normalize_callbacks([]), event) is False


# ----------------------------------------------------------------------------------- light import


def test_importing_the_callback_module_is_light():
    heavy = ["torch", "tokenizers", "safetensors", "transformers", "omegaconf", "tensorboard", "numpy"]
    code = (
        "import json, sys, time\n"
        "t0 = time.perf_counter()\n"
        "import megatron.bridge.training.callbacks\n"
        "elapsed = time.perf_counter() - t0\n"
        f"heavy = {heavy!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "                or m.startswith(('megatron.bridge.models', 'megatron.bridge.data')))\n"
        "print(json.dumps({'elapsed': elapsed, 'loaded': loaded}))\n"
    )
    # Best of three: a loaded CI machine can stall one start-up.
    results = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert results[0]["loaded"] == []
    assert min(r["elapsed"] for r in results) < 0.3


# ------------------------------------------------------------------------------------ fire sites


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _docstring_fire_sites() -> dict[str, str]:
    """The first table of the callbacks.py module docstring: event -> file name."""
    doc = callbacks_module.__doc__ or ""
    start = doc.index("Where each event fires")
    sites: dict[str, str] = {}
    current_file = None
    in_table = False
    for line in doc[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if set("".join(cells)) <= set("-: ") or cells[0] == "event":
            continue
        if cells[1]:
            current_file = cells[1].rsplit("/", 1)[-1]
        for token in re.findall(r"on_[a-z_]+\*?", cells[0]):
            if token.endswith("*"):
                names = [e for e in EVENTS if e.startswith(token[:-1])]
            else:
                names = [token]
            for name in names:
                sites[name] = current_file
    return sites


def test_module_docstring_lists_the_fire_site_of_every_event():
    assert _docstring_fire_sites() == FIRE_SITES


@pytest.mark.parametrize("event", EVENTS)
def test_each_event_is_a_literal_string_in_exactly_one_file(event):
    # builtin_callbacks.py holds user-side callbacks, which may name an event (an `every` filter).
    files = sorted(
        str(path.relative_to(TRAINING_DIR))
        for path in TRAINING_DIR.rglob("*.py")
        if path.name not in ("callbacks.py", "builtin_callbacks.py") and event in _string_constants(path)
    )
    assert files == [FIRE_SITES[event]]
