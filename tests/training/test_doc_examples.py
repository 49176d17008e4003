"""The callbacks guide's examples, copied verbatim; only the recipe is shrunk so they run in seconds.

Each example's `config = qwen25_500m_pretrain_config()` is followed by `shrink_500m(config, tmp)`,
which assigns the recipe's fields down to tiny sizes, as the guide tells users to do. Everything
else (the 500m recipe's bf16 mixed precision, manual GC, NaN checking, checkpointing) is kept.
"""

from __future__ import annotations

import math
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from megatron.bridge.recipes.qwen import qwen25_500m_pretrain_config
from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

TRAIN_ITERS = 3


def shrink_500m(config, tmp):
    """The lines a user adds after `config = qwen25_500m_pretrain_config()` to fit a CPU test."""
    config.model.num_layers = 1
    config.model.hidden_size = 64
    config.model.ffn_hidden_size = 128
    config.model.num_attention_heads = 4
    config.model.num_query_groups = 2
    config.model.seq_length = 32
    config.dataset.seq_length = 32
    config.tokenizer.vocab_size = 128
    config.train.train_iters = TRAIN_ITERS
    config.train.global_batch_size = 4
    config.train.micro_batch_size = 2
    config.scheduler.lr_warmup_iters = 1
    config.validation.eval_interval = 2
    config.validation.eval_iters = 1
    config.checkpoint.save = str(tmp / "checkpoints")
    config.checkpoint.load = str(tmp / "checkpoints")
    config.checkpoint.save_interval = 2
    config.logger.tensorboard_dir = str(tmp / "tb_logs")
    config.logger.log_interval = 1
    return config


# ---------------------------------------------------------------------------- Quick Start: class-based


class MyCallback(Callback):
    def on_train_start(self, context):
        context.user_state['start_time'] = time.time()
        print(f"Training started at step {context.state.train_state.step}")

    def on_train_step_end(self, context):
        if context.loss_dict:
            print(f"Step {context.state.train_state.step}: loss={context.loss_dict}")

    def on_train_end(self, context):
        elapsed = time.time() - context.user_state['start_time']
        print(f"Training completed in {elapsed:.2f}s")


STEP_LOSS = r"Step {step}: loss=\{{'lm loss': tensor\([0-9.]+(, [^)]*)?\)\}}"


def test_class_based_quick_start(chdir, capsys):
    # Create a config that fits on a single GPU
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)

    assert config.mixed_precision == "bf16_mixed"  # kept: bf16 autocast, also on CPU

    # Pass callbacks to pretrain
    pretrain(config, forward_step, callbacks=[MyCallback()])

    out = capsys.readouterr().out
    assert out.count("Training started at step 0\n") == 1
    for step in range(TRAIN_ITERS):
        assert len(re.findall(STEP_LOSS.format(step=step), out)) == 1, step
    assert f"Step {TRAIN_ITERS}:" not in out
    assert len(re.findall(r"Training completed in \d+\.\d\ds\n", out)) == 1
    assert out.index("Training started") < out.index("Step 0: loss=") < out.index("Training completed")
    # The recipe's own outputs went where the shrunk config points.
    assert (chdir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)
    assert any(p.name.startswith("events.out.tfevents") for p in (chdir / "tb_logs").iterdir())
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------- Quick Start: functional


def log_step(context):
    step = context.state.train_state.step
    if context.loss_dict:
        print(f"Step {step}: {context.loss_dict}")


def test_functional_quick_start(chdir, capsys):
    callback_manager = CallbackManager()
    callback_manager.register("on_train_step_end", log_step)

    # Create a config that fits on a single GPU
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)

    pretrain(config, forward_step, callbacks=callback_manager)

    out = capsys.readouterr().out
    lines = re.findall(r"^Step (\d+): \{'lm loss': tensor\(([0-9.]+)(?:, [^)]*)?\)\}$", out, flags=re.MULTILINE)
    assert [int(step) for step, _ in lines] == list(range(TRAIN_ITERS))
    assert all(0 < float(loss) < 10 for _, loss in lines)


# -------------------------------------------------------------------------------- Mixing both patterns


class TimingCallback(Callback):
    """Left undefined by the guide: times each training step."""

    def on_train_step_start(self, context):
        context.user_state["step_started"] = time.perf_counter()

    def on_train_step_end(self, context):
        context.user_state.setdefault("step_times", []).append(
            time.perf_counter() - context.user_state["step_started"])


class MetricsCallback(Callback):
    """Left undefined by the guide: collects the training losses and the validation losses."""

    def on_train_step_end(self, context):
        context.user_state.setdefault("losses", []).append(context.loss_dict["lm loss"].item())

    def on_eval_end(self, context):
        context.user_state.setdefault("eval_losses", []).append(context.total_loss_dict["lm loss"].item())


def test_mixing_both_patterns(chdir, capsys):
    manager = CallbackManager()
    manager.add(MyCallback())
    manager.add([TimingCallback(), MetricsCallback()])
    manager.register("on_eval_end", lambda ctx: print("Evaluation complete!"))

    # Create a config that fits on a single GPU
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)

    pretrain(config, forward_step, callbacks=manager)

    out = capsys.readouterr().out
    # In-training validation after step 2 and the post-training validation.
    assert out.count("Evaluation complete!\n") == 2
    assert out.count("Training started at step 0\n") == 1
    assert out.count("Training completed in ") == 1
    assert len(manager.user_state["step_times"]) == TRAIN_ITERS
    assert all(t > 0 for t in manager.user_state["step_times"])
    assert len(manager.user_state["losses"]) == TRAIN_ITERS
    assert all(math.isfinite(loss) for loss in manager.user_state["losses"])
    assert len(manager.user_state["eval_losses"]) == 2
    assert "start_time" in manager.user_state


# ------------------------------------------------------------------------------------------ User State


class StepCounterCallback(Callback):
    def on_train_start(self, context):
        context.user_state['callback_step_count'] = 0

    def on_train_step_end(self, context):
        context.user_state['callback_step_count'] += 1

    def on_train_end(self, context):
        print(f"Callback saw {context.user_state['callback_step_count']} steps")


def test_step_counter(chdir, capsys):
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)
    pretrain(config, forward_step, callbacks=[StepCounterCallback()])
    assert f"Callback saw {TRAIN_ITERS} steps\n" in capsys.readouterr().out


# --------------------------------------------------------------------------------- Distributed Training


class RankZeroCallback(Callback):
    def on_train_step_end(self, context):
        if dist.get_rank() == 0:
            print(f"Step {context.state.train_state.step} complete")


def test_rank_zero_callback(chdir, capsys):
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)
    pretrain(config, forward_step, callbacks=[RankZeroCallback()])
    out = capsys.readouterr().out
    assert re.findall(r"^Step (\d+) complete$", out, flags=re.MULTILINE) == [str(s) for s in range(TRAIN_ITERS)]
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------------- Exception Handling


class ExternalService:
    """A stand-in for the guide's `external_service`: its second call fails."""

    def __init__(self):
        self.logged = []

    def log(self, payload):
        self.logged.append(payload)
        if len(self.logged) == 2:
            raise ConnectionError("service unavailable")


external_service = ExternalService()


def safe_callback(context):
    try:
        # Your logic here
        external_service.log(context.loss_dict)
    except Exception as e:
        print(f"Callback failed: {e}")
        # Don't re-raise to avoid stopping training


def test_safe_callback_keeps_training_going(chdir, capsys):
    external_service.logged.clear()
    manager = CallbackManager()
    manager.register("on_train_step_end", safe_callback)
    manager.add(StepCounterCallback())
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)
    pretrain(config, forward_step, callbacks=manager)
    out = capsys.readouterr().out
    assert out.count("Callback failed: service unavailable\n") == 1
    assert f"Callback saw {TRAIN_ITERS} steps\n" in out
    assert len(external_service.logged) == TRAIN_ITERS
    assert all(list(payload) == ["lm loss"] for payload in external_service.logged)


def test_unguarded_callback_exception_stops_training(chdir, capsys):
    external_service.logged.clear()

    def unsafe_callback(context):
        external_service.log(context.loss_dict)

    manager = CallbackManager()
    manager.register("on_train_step_end", unsafe_callback)
    manager.add(StepCounterCallback())
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)
    with pytest.raises(ConnectionError, match="service unavailable"):
        pretrain(config, forward_step, callbacks=manager)
    assert "Callback saw" not in capsys.readouterr().out
    assert len(external_service.logged) == 2
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------- Introspection


def my_fn(context):
    pass


def test_introspection(capsys):
    manager = CallbackManager()
    manager.register("on_train_start", my_fn)

    # Check if any callbacks exist for an event
    if manager.has_callbacks("on_train_start"):
        print("Callbacks registered for on_train_start")

    # List all callbacks for an event
    callbacks = manager.list_callbacks("on_train_start")
    print(f"Found {len(callbacks)} callbacks")

    # Get all valid event names
    print(manager.events)  # frozenset of valid event names

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Callbacks registered for on_train_start"
    assert out[1] == "Found 1 callbacks"
    assert out[2].startswith("frozenset({") and "'on_checkpoint_save'" in out[2]
    assert out[2].count("'on_") == 14


# ------------------------------------------------------------------------------------ Proprietary Metrics


class InternalMetricsClient:
    """A stand-in for the guide's internal client: remembers what it was sent."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.sent = []

    def send(self, payload):
        self.sent.append(payload)


class ProprietaryMetricsCallback(Callback):
    """Send metrics to internal monitoring system."""

    def __init__(self, endpoint: str):
        self.client = InternalMetricsClient(endpoint)

    def on_train_step_end(self, context):
        if context.loss_dict:
            self.client.send({
                "step": context.state.train_state.step,
                "loss": context.loss_dict.get("lm loss"),
                "grad_norm": context.grad_norm,
                "cluster_id": os.environ.get("CLUSTER_ID"),
            })


def test_proprietary_metrics(chdir, monkeypatch):
    monkeypatch.setenv("CLUSTER_ID", "cluster-7")
    callback = ProprietaryMetricsCallback("https://metrics.example.invalid")
    config = qwen25_500m_pretrain_config()
    shrink_500m(config, chdir)
    pretrain(config, forward_step, callbacks=[callback])
    sent = callback.client.sent
    assert callback.client.endpoint == "https://metrics.example.invalid"
    assert [payload["step"] for payload in sent] == list(range(TRAIN_ITERS))
    for payload in sent:
        assert isinstance(payload["loss"], torch.Tensor) and payload["loss"].dim() == 0
        assert math.isfinite(payload["loss"].item())
        assert type(payload["grad_norm"]) is float and math.isfinite(payload["grad_norm"])
        assert payload["cluster_id"] == "cluster-7"
