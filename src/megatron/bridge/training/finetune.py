"""`finetune`: `pretrain` from existing weights, refusing to start from random ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.utils.errors import ConfigError

__all__ = ["finetune", "prepare_finetune"]


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
        (a training checkpoint, e.g. one `AutoBridge.import_ckpt` converted, or a local Hugging Face
        model folder read directly);
      - the weights `config.model` loads itself, for a provider from
        `AutoBridge.to_megatron_provider(load_weights=True)` (step 0, fresh optimizer).

    With `config.peft` (LoRA, DoRA) the base weights come from `pretrained_checkpoint` (or the provider)
    on a resume too: the run's own checkpoints hold the adapters, optimizer and counters only.

    A `HuggingFaceTokenizer` without `tokenizer_model` takes the tokenizer of the Hugging Face folder
    the base weights come from (the folder itself, or the `hf/` folder `AutoBridge.import_ckpt` keeps).

    Raises:
        ConfigError: naming `checkpoint.pretrained_checkpoint` when none of these brings weights, before
            any work starts.
    """
    from megatron.bridge.training.pretrain import pretrain

    prepare_finetune(config)
    pretrain(config, forward_step_func, callbacks)


def prepare_finetune(config: ConfigContainer) -> None:
    """What `finetune` checks and fills in before `pretrain` validates: the command line runs it too.

    Refuses (`ConfigError`) a `checkpoint.load` that does not exist and a run whose weights would be
    random; gives a `HuggingFaceTokenizer` without `tokenizer_model` the base model's tokenizer.
    """
    from megatron.bridge.checkpoint import io as checkpoint_io
    from megatron.bridge.training.checkpointing import require_load_path

    ckpt = config.checkpoint
    require_load_path(ckpt)
    resumable = ckpt.load or ckpt.save
    resumes = bool(resumable) and checkpoint_io.find_latest(resumable) is not None
    provider_loads = any(getattr(hook, "loads_weights", False) for hook in config.model.pre_wrap_hooks)
    # A LoRA run's checkpoints hold its adapters only: even a resume needs the base weights from somewhere.
    if (not resumes or config.peft is not None) and not provider_loads:
        _check_pretrained_checkpoint(ckpt.pretrained_checkpoint, ckpt.load, adapted=config.peft is not None)
    _default_tokenizer(config)


def _default_tokenizer(config: ConfigContainer) -> None:
    # Before validation: a finetuning run reads text with its base model's tokenizer unless told otherwise.
    tokenizer, pretrained = config.tokenizer, config.checkpoint.pretrained_checkpoint
    if tokenizer.tokenizer_type != "HuggingFaceTokenizer" or tokenizer.tokenizer_model or not pretrained:
        return
    from megatron.bridge.checkpoint import io as checkpoint_io
    from megatron.bridge.models.conversion.megatron_checkpoint import find_hf_source
    from megatron.bridge.training.checkpointing import is_hf_model_folder

    path = Path(pretrained)
    latest = None if is_hf_model_folder(path) else checkpoint_io.find_latest(path)
    folder = path if latest is None else find_hf_source(latest)
    if folder is not None and (folder / "tokenizer.json").is_file():
        tokenizer.tokenizer_model = str(folder)


def _check_pretrained_checkpoint(pretrained: str | None, load: str | None, *, adapted: bool) -> None:
    from megatron.bridge.checkpoint import io as checkpoint_io
    from megatron.bridge.training.checkpointing import is_hf_model_folder

    if not pretrained:
        where = ("the base weights of a LoRA run come from it" if adapted else
                 f"checkpoint.load={load!r} holds no checkpoint" if load else "checkpoint.load is None")
        raise ConfigError(
            f"checkpoint.pretrained_checkpoint=None is invalid for finetune: {where}, so training would start "
            "from random weights; set checkpoint.pretrained_checkpoint to the checkpoint or Hugging Face model "
            "folder to start from, or checkpoint.load to resume from"
        )
    path = Path(pretrained)
    if not is_hf_model_folder(path) and checkpoint_io.find_latest(path) is None:
        raise ConfigError(
            f"checkpoint.pretrained_checkpoint={pretrained!r} is invalid: it holds no checkpoint (expected "
            f"{checkpoint_io.TRACKER_FILE} and iter_* folders, an iter_* folder, or a Hugging Face model folder "
            "with config.json and its weights)"
        )
