"""The shared defaults of every finetuning recipe (full SFT and LoRA / DoRA), written once.

Megatron Bridge's `*_sft_config` / `*_peft_config` defaults: sequences of 2048 packed from
`dataset_root/{training,validation}.jsonl`, global batch 128 of micro batch 1, Adam with warm-up 10
to lr 5e-6 (full SFT) or 1e-4 (LoRA, dim 32, alpha 32), cosine to 0, bf16. What a recipe cannot know
stays unset and is refused by name until given: the base weights (`checkpoint.pretrained_checkpoint`:
a training checkpoint or a local Hugging Face folder), the data (`dataset.dataset_root`) and, for a
Hugging Face base, the tokenizer (`tokenizer.tokenizer_model`, which `finetune` takes from the base
folder when it holds one).
"""

from __future__ import annotations

import os

from megatron.bridge.data.sft.config import GPTSFTDatasetConfig, PackedSequenceSpecs
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.peft.base import PEFT
from megatron.bridge.peft.dora import DoRA
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    LoggerConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.utils.errors import config_error

__all__ = ["PEFT_SCHEMES", "finetune_common", "peft_for_scheme"]

PEFT_SCHEMES = ("lora", "dora")
SFT_LR, PEFT_LR = 5e-6, 1e-4


def peft_for_scheme(peft_scheme: str | None) -> PEFT | None:
    """The adapters a `*_peft_config(peft_scheme=...)` recipe trains: upstream's LoRA (dim 32, alpha 32) or DoRA."""
    if peft_scheme is None:
        return None
    if peft_scheme == "lora":
        return LoRA(dim=32, alpha=32)
    if peft_scheme == "dora":
        return DoRA(dim=32)
    raise config_error("peft_scheme", peft_scheme, f"choose one of {', '.join(PEFT_SCHEMES)}")


def finetune_common(model: GPTModelProvider, *, peft_scheme: str | None = None, seq_length: int = 2048,
                    name: str = "default", dir: str | None = None) -> ConfigContainer:
    """A complete single-GPU finetuning config for `model`: full SFT, or adapters when `peft_scheme` is given.

    The model keeps its own vocabulary (the base weights have its rows). Checkpoints go to
    `<dir>/<name>/checkpoints` and TensorBoard logs to `<dir>/<name>/tb_logs` (`dir`: ./nemo_experiments).
    """
    run_dir = os.path.join(dir or os.path.join(os.getcwd(), "nemo_experiments"), name)
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    model.seq_length = seq_length
    peft = peft_for_scheme(peft_scheme)
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=100, global_batch_size=128, micro_batch_size=1),
        validation=ValidationConfig(eval_interval=50, eval_iters=10),
        optimizer=OptimizerConfig(optimizer="adam", lr=SFT_LR if peft is None else PEFT_LR, min_lr=0.0,
                                  weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
                                  bf16=True),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=10, lr_warmup_init=0.0),
        dataset=GPTSFTDatasetConfig(seq_length=seq_length, seed=5678, enable_offline_packing=True,
                                    offline_packing_specs=PackedSequenceSpecs(packed_sequence_size=seq_length)),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer"),
        # load=None resumes from `save` all the same, and stays right when only `save` is overridden.
        checkpoint=CheckpointConfig(save=checkpoint_dir, load=None, save_interval=100),
        logger=LoggerConfig(log_interval=1, tensorboard_dir=os.path.join(run_dir, "tb_logs")),
        rng=RNGConfig(seed=5678),
        ddp=DistributedDataParallelConfig(check_for_nan_in_grad=True),
        mixed_precision="bf16_mixed",
        peft=peft,
    )
