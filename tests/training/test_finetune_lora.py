"""LoRA through `finetune`: base weights from a checkpoint, only adapters train, checkpoints hold the adapters.

The base model is a tiny pretraining run's checkpoint (module-scoped); each test finetunes it with
`cfg.peft = LoRA(...)` for a few real optimizer steps on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from helpers import make_tiny_config
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.peft.dora import DoRA
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.peft.state import is_adapter_param
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.finetune import finetune
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.utils.errors import ConfigError


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained checkpoint of the tiny model (4 steps)."""
    save = tmp_path_factory.mktemp("base") / "ckpt"
    pretrain(make_tiny_config(checkpoint__save=str(save)), forward_step)
    return save


def lora_config(save: Path | None, base: Path, peft: Any = None, **overrides: Any):
    cfg = make_tiny_config(checkpoint__save=None if save is None else str(save),
                           checkpoint__pretrained_checkpoint=str(base), optimizer__lr=1e-2, **overrides)
    cfg.peft = peft if peft is not None else LoRA(dim=4, alpha=8)
    return cfg


class Weights(Callback):
    """The model's parameters at the start and end of training, the losses, and the optimizer's parameters."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_start(self, context):
        self.start = {k: v.detach().clone() for k, v in context.model[0].state_dict().items()}
        self.optimized = {id(p) for group in context.optimizer.param_groups for p in group["params"]}
        self.named = dict(context.model[0].named_parameters())

    def on_train_step_end(self, context):
        self.losses.append(context.loss_dict["lm loss"].item())

    def on_train_end(self, context):
        self.end = {k: v.detach().clone() for k, v in context.model[0].state_dict().items()}


def stored_model_tensors(directory: Path) -> dict[str, TensorStorageMetadata]:
    index = checkpoint_io.read_index(directory)
    return {key: meta for key, meta in index.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


@pytest.mark.parametrize("peft", [LoRA(dim=4, alpha=8), DoRA(dim=4, alpha=8)], ids=["lora", "dora"])
def test_only_the_adapters_train_and_the_base_is_the_pretrained_one(tmp_path, base, peft):
    probe = Weights()
    finetune(lora_config(None, base, peft), forward_step, [probe])
    pretrained = stored_model_tensors(checkpoint_io.find_latest(base))
    adapters = [k for k in probe.start if is_adapter_param(k)]
    assert adapters and set(probe.start) - set(adapters) == {k[len("model."):] for k in pretrained}
    for name in probe.start:
        changed = not torch.equal(probe.start[name], probe.end[name])
        assert changed == is_adapter_param(name), name
    trainable = {id(p) for name, p in probe.named.items() if is_adapter_param(name)}
    assert probe.optimized == trainable, "the optimizer holds the adapters and nothing else"


def test_the_checkpoint_holds_the_adapters_only_and_is_small(tmp_path, base):
    finetune(lora_config(tmp_path / "lora", base), forward_step)
    directory = checkpoint_io.find_latest(tmp_path / "lora")
    stored = stored_model_tensors(directory)
    assert stored and all(is_adapter_param(name) for name in stored)
    size = sum(p.stat().st_size for p in directory.glob("*.distcp"))
    base_size = sum(p.stat().st_size for p in checkpoint_io.find_latest(base).glob("*.distcp"))
    assert size < 0.25 * base_size, (size, base_size)


def test_a_lora_run_resumes_exactly(tmp_path, base):
    straight, first, second = Weights(), Weights(), Weights()
    finetune(lora_config(None, base, train__train_iters=4), forward_step, [straight])
    # Stopped after step 2 (the schedule spans 4 steps in both halves), then resumed from its checkpoint.
    finetune(lora_config(tmp_path / "lora", base, train__train_iters=4, train__exit_interval=2), forward_step,
             [first])
    finetune(lora_config(tmp_path / "lora", base, train__train_iters=4), forward_step, [second])
    assert first.losses + second.losses == straight.losses
    assert all(torch.equal(second.end[k], straight.end[k]) for k in straight.end)


def test_a_lora_run_without_base_weights_is_refused_even_when_resuming(tmp_path, base):
    finetune(lora_config(tmp_path / "lora", base, train__train_iters=2), forward_step)
    cfg = lora_config(tmp_path / "lora", base, train__train_iters=4)
    cfg.checkpoint.pretrained_checkpoint = None
    with pytest.raises(ConfigError, match="base weights of a LoRA run"):
        finetune(cfg, forward_step)


def test_a_target_the_model_does_not_have_is_refused_before_any_work(tmp_path, base):
    cfg = lora_config(tmp_path / "lora", base, LoRA(target_modules=["*.layers.7.*.linear_qkv"]))
    with pytest.raises(ConfigError, match="peft"):
        finetune(cfg, forward_step)
    assert not (tmp_path / "lora").exists()
