"""`finetune`: `pretrain` from existing weights, refusing to start from random ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.config import ConfigContainer

__all__ = ["finetune"]


def finetune(
    config: ConfigContainer,
    forward_step_func: Callable[..., Any],
    callbacks: CallbackManager | Callback | list[Callback] | None = None,
) -> None:
    """Finetune `config.model` from a checkpoint; callbacks fire exactly as in `pretrain`.

    The run starts from the first of:
      - `checkpoint.load` (or `checkpoint.save`) when it holds a checkpoint: a normal resume (model,
        optimizer, step), so an interrupted finetuning run continues where it stopped;
      - `checkpoint.pretrained_checkpoint`: its model weights only, with a fresh optimizer at step 0
        (e.g. a Hugging Face model converted with `AutoBridge.import_ckpt`);
      - the weights `config.model` loads itself, for a provider from
        `AutoBridge.to_megatron_provider(load_weights=True)` (step 0, fresh optimizer).

    Raises:
        ValueError: naming `checkpoint.pretrained_checkpoint` when none of these brings weights, before
            any work starts.
    """
    from megatron.bridge.checkpoint import io as checkpoint_io
    from megatron.bridge.training.checkpointing import require_load_path
    from megatron.bridge.training.pretrain import pretrain

    ckpt = config.checkpoint
    require_load_path(ckpt)
    resumable = ckpt.load or ckpt.save
    provider_loads = any(getattr(hook, "loads_weights", False) for hook in config.model.pre_wrap_hooks)
    if (not resumable or checkpoint_io.find_latest(resumable) is None) and not provider_loads:
        _check_pretrained_checkpoint(ckpt.pretrained_checkpoint, ckpt.load)
    pretrain(config, forward_step_func, callbacks)


def _check_pretrained_checkpoint(pretrained: str | None, load: str | None) -> None:
    from megatron.bridge.checkpoint import io as checkpoint_io

    if not pretrained:
        where = f"checkpoint.load={load!r} holds no checkpoint" if load else "checkpoint.load is None"
        raise ValueError(
            f"checkpoint.pretrained_checkpoint=None is invalid for finetune: {where}, so training would start "
            "from random weights; set checkpoint.pretrained_checkpoint to the checkpoint to start from (for a "
            "Hugging Face model, convert it first with AutoBridge.import_ckpt), or checkpoint.load to resume from"
        )
    if checkpoint_io.find_latest(pretrained) is None:
        raise ValueError(
            f"checkpoint.pretrained_checkpoint={pretrained!r} is invalid: it holds no checkpoint (expected "
            f"{checkpoint_io.TRACKER_FILE} and iter_* folders, or an iter_* folder)"
        )
