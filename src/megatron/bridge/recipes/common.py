"""The shared defaults every pretraining recipe starts from, written once."""

from __future__ import annotations

import os

from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    GPTDatasetConfig,
    LoggerConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)

__all__ = ["DEFAULT_VOCAB_SIZE", "long_schedule", "pretrain_common"]

DEFAULT_VOCAB_SIZE = 32_000


def pretrain_common(model: GPTModelProvider, *, name: str = "default", dir: str | None = None) -> ConfigContainer:
    """A complete single-GPU pretraining config for `model`, with Megatron Bridge's defaults.

    Checkpoints go to `<dir>/<name>/checkpoints` and TensorBoard logs to `<dir>/<name>/tb_logs`,
    where `dir` defaults to `./nemo_experiments` (as upstream), so an unshrunk run resumes by itself.
    """
    run_dir = os.path.join(dir or os.path.join(os.getcwd(), "nemo_experiments"), name)
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    model.vocab_size = None  # follow the tokenizer
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=300_000, global_batch_size=32, micro_batch_size=2, manual_gc=True,
                             manual_gc_interval=100),
        validation=ValidationConfig(eval_interval=500, eval_iters=32),
        optimizer=OptimizerConfig(optimizer="adam", lr=3e-4, min_lr=3e-5, weight_decay=0.1, adam_beta1=0.9,
                                  adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=True),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=500, lr_warmup_init=0.0,
                                  start_weight_decay=0.033, end_weight_decay=0.033,
                                  weight_decay_incr_style="constant", override_opt_param_scheduler=True),
        dataset=GPTDatasetConfig(seq_length=model.seq_length, random_seed=1234, split="9999,8,2"),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=DEFAULT_VOCAB_SIZE),
        checkpoint=CheckpointConfig(save=checkpoint_dir, load=checkpoint_dir, save_interval=500),
        logger=LoggerConfig(log_interval=10, tensorboard_dir=os.path.join(run_dir, "tb_logs")),
        rng=RNGConfig(seed=1234),
        ddp=DistributedDataParallelConfig(check_for_nan_in_grad=True),
        mixed_precision="bf16_mixed",
    )


def long_schedule(cfg: ConfigContainer) -> ConfigContainer:
    """Upstream's Llama 3 and Gemma 3 schedule, set on `cfg` in place: 1,168,251 iterations of 512 sequences
    (micro batch 1), 2000 warm-up iterations and an evaluation every 2000."""
    cfg.train.train_iters = 1_168_251
    cfg.train.global_batch_size = 512
    cfg.train.micro_batch_size = 1
    cfg.validation.eval_interval = 2000
    cfg.scheduler.lr_warmup_iters = 2000
    return cfg
