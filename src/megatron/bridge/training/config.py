"""Typed configuration for a training run.

`ConfigContainer` groups one dataclass per component. Recipes return a complete container; users
shrink it by assigning fields (`cfg.train.train_iters = 10`) before calling `pretrain`, which calls
`ConfigContainer.validate()` before any work starts. Every failed check raises a `ValueError`
that names the field, the offending value and what is allowed.

The model config is the model provider itself (`megatron.bridge.models.GPTModelProvider`), as in
Megatron Bridge: its fields describe the architecture and `provide()` builds it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any

from megatron.bridge.data.config import (  # noqa: F401 - re-exported: every import path of the contract keeps working
    DATALOADER_TYPES,
    TOKENIZER_TYPES,
    GPTDatasetConfig,
    MockGPTDatasetConfig,
    TokenizerConfig,
)
from megatron.bridge.data.sft.config import GPTSFTDatasetConfig
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.peft.base import PEFT
from megatron.bridge.utils.config_checks import (
    NUMPY_SEED_LIMIT,  # noqa: F401 - re-exported
    check_choice,
    check_fraction,
    check_number,
    check_positive,
    check_seed,
    is_int,
)
from megatron.bridge.utils.config_fields import KnownFieldsOnly, UnknownFieldError, to_plain  # noqa: F401
from megatron.bridge.utils.errors import ConfigError, config_error  # noqa: F401 - re-exported

__all__ = [
    "CKPT_FORMATS",
    "CheckpointConfig",
    "ConfigContainer",
    "ConfigError",
    "DATALOADER_TYPES",
    "DIST_BACKENDS",
    "DistributedDataParallelConfig",
    "DistributedInitConfig",
    "GPTDatasetConfig",
    "GPTModelProvider",
    "LR_DECAY_STYLES",
    "LoggerConfig",
    "MIXED_PRECISION_RECIPES",
    "MockGPTDatasetConfig",
    "NUMPY_SEED_LIMIT",
    "OPTIMIZERS",
    "OptimizerConfig",
    "RNGConfig",
    "SchedulerConfig",
    "TOKENIZER_TYPES",
    "TokenizerConfig",
    "TrainingConfig",
    "UnknownFieldError",
    "ValidationConfig",
    "WEIGHT_DECAY_INCR_STYLES",
    "WSD_DECAY_STYLES",
    "capped_warmup_iters",
]

LR_DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
WEIGHT_DECAY_INCR_STYLES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adam", "sgd")
MIXED_PRECISION_RECIPES = ("bf16_mixed", "fp16_mixed", "fp32")
CKPT_FORMATS = ("torch_dist",)
DIST_BACKENDS = ("nccl", "gloo")
TIMING_LOG_LEVELS = (0, 1, 2)
TIMING_LOG_OPTIONS = ("max", "minmax", "all")


def capped_warmup_iters(warmup_iters: int, decay_iters: int) -> int:
    """The warm-up the schedule uses: `warmup_iters`, capped at `decay_iters - 1` (Megatron Bridge's rule)."""
    return max(0, min(warmup_iters, decay_iters - 1))


@dataclass(kw_only=True)
class TrainingConfig(KnownFieldsOnly):
    """How long to train and with which batch sizes."""

    _section = "train"

    train_iters: int | None = None
    """Number of optimizer steps to train for."""
    global_batch_size: int = 32
    """Samples per optimizer step, summed over micro-batches and data-parallel ranks."""
    micro_batch_size: int = 2
    """Samples per forward/backward pass on one rank."""
    exit_interval: int | None = None
    """Stop (after saving) once the step count is a multiple of this."""
    exit_duration_in_mins: float | None = None
    """Stop (after saving) once training has run for this many minutes."""
    exit_signal_handler: bool = False
    """On SIGTERM/SIGINT, finish the current step, save and return."""
    manual_gc: bool = False
    """Disable Python's automatic garbage collector and collect every `manual_gc_interval` steps."""
    manual_gc_interval: int = 0
    """Steps between manual collections (0: only at the start and end of training)."""
    compile: bool | None = None
    """`torch.compile` each transformer block (None: on when training on a GPU, off on the CPU)."""

    def validate(self) -> None:
        check_positive("train.train_iters", self.train_iters)
        check_positive("train.global_batch_size", self.global_batch_size, optional=False)
        check_positive("train.micro_batch_size", self.micro_batch_size, optional=False)
        check_positive("train.exit_interval", self.exit_interval)
        check_number("train.exit_duration_in_mins", self.exit_duration_in_mins, "a positive number or None",
                      ok=lambda v: v > 0, infinite=True, optional=True)
        if not is_int(self.manual_gc_interval) or self.manual_gc_interval < 0:
            raise config_error("train.manual_gc_interval", self.manual_gc_interval, "an integer >= 0")


@dataclass(kw_only=True)
class ValidationConfig(KnownFieldsOnly):
    """When and how long to evaluate on the validation split."""

    _section = "validation"

    eval_interval: int | None = 1000
    """Validate every this many steps during training (None: only after training)."""
    eval_iters: int = 100
    """Batches per validation or test pass (0 disables validation and test)."""
    skip_train: bool = False
    """Skip training and only run the post-training validation and test passes."""

    def validate(self) -> None:
        check_positive("validation.eval_interval", self.eval_interval)
        if not is_int(self.eval_iters) or self.eval_iters < 0:
            raise config_error("validation.eval_iters", self.eval_iters, "an integer >= 0")


@dataclass(kw_only=True)
class OptimizerConfig(KnownFieldsOnly):
    """The optimizer and its hyper-parameters."""

    _section = "optimizer"

    optimizer: str = "adam"
    """`adam` (decoupled weight decay, i.e. AdamW) or `sgd`."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """Adam's first-moment coefficient."""
    adam_beta2: float = 0.999
    """Adam's second-moment coefficient."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    sgd_momentum: float = 0.9
    """Momentum for `sgd`."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping and no reported norm; inf: report, never clip)."""
    bf16: bool = False
    """Train with bf16 compute (set by `mixed_precision="bf16_mixed"`)."""
    fp16: bool = False
    """Train with fp16 compute and loss scaling (set by `mixed_precision="fp16_mixed"`)."""
    initial_loss_scale: float = 2.0**16
    """fp16 only: the dynamic loss scale at the start of training."""
    min_loss_scale: float = 1.0
    """fp16 only: the loss scale never backs off below this."""
    loss_scale_window: int = 2000
    """fp16 only: steps without overflow after which the loss scale doubles."""
    use_distributed_optimizer: bool | None = None
    """The same switch as `ddp.use_distributed_optimizer` (set either; None: follow the other, else False)."""

    def validate(self) -> None:
        check_choice("optimizer.optimizer", self.optimizer, OPTIMIZERS)
        # A zero rate is legal, as in Megatron: it is how one checks that weights load unchanged.
        check_number("optimizer.lr", self.lr, "a finite number >= 0", ok=lambda v: v >= 0)
        check_number("optimizer.min_lr", self.min_lr, f"a finite number in [0, optimizer.lr={self.lr}]",
                      ok=lambda v: 0 <= v <= self.lr)
        check_number("optimizer.weight_decay", self.weight_decay, "a finite number >= 0", ok=lambda v: v >= 0)
        check_fraction("optimizer.adam_beta1", self.adam_beta1)
        check_fraction("optimizer.adam_beta2", self.adam_beta2)
        check_number("optimizer.adam_eps", self.adam_eps, "a finite positive number", ok=lambda v: v > 0)
        check_fraction("optimizer.sgd_momentum", self.sgd_momentum)
        check_number("optimizer.clip_grad", self.clip_grad,
                      "a number >= 0 (0 disables clipping, inf measures the norm without clipping)",
                      ok=lambda v: v >= 0, infinite=True)
        if self.bf16 and self.fp16:
            raise config_error("optimizer.fp16", self.fp16, "False when optimizer.bf16=True (pick one precision)")
        check_number("optimizer.initial_loss_scale", self.initial_loss_scale, "a finite positive number",
                      ok=lambda v: v > 0)
        check_number("optimizer.min_loss_scale", self.min_loss_scale,
                      f"a finite positive number at most optimizer.initial_loss_scale={self.initial_loss_scale}",
                      ok=lambda v: 0 < v <= self.initial_loss_scale)
        check_positive("optimizer.loss_scale_window", self.loss_scale_window, optional=False)


@dataclass(kw_only=True)
class SchedulerConfig(KnownFieldsOnly):
    """Learning-rate warm-up and decay, and the weight-decay schedule."""

    _section = "scheduler"

    lr_decay_style: str = "linear"
    """constant, linear, cosine or WSD (warmup-stable-decay)."""
    lr_warmup_iters: int = 0
    """Steps of linear warm-up from `lr_warmup_init` to `optimizer.lr`."""
    lr_warmup_init: float = 0.0
    """Learning rate at step 0 of warm-up."""
    lr_decay_iters: int | None = None
    """Step at which decay reaches `optimizer.min_lr` (None: `train.train_iters`)."""
    lr_wsd_decay_iters: int | None = None
    """With WSD: the number of final decay steps (None: 10% of the decay span)."""
    lr_wsd_decay_style: str = "exponential"
    """With WSD: the shape of the final decay (linear, cosine, exponential, minus_sqrt)."""
    start_weight_decay: float | None = None
    """Weight decay at step 0 (None: `optimizer.weight_decay`)."""
    end_weight_decay: float | None = None
    """Weight decay at the end of the increment (None: `optimizer.weight_decay`)."""
    weight_decay_incr_style: str = "constant"
    """How weight decay moves from start to end: constant, linear or cosine."""
    override_opt_param_scheduler: bool = False
    """On resume, take the schedule from this config rather than from the checkpoint."""

    def validate(self) -> None:
        check_choice("scheduler.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        check_choice("scheduler.lr_wsd_decay_style", self.lr_wsd_decay_style, WSD_DECAY_STYLES)
        check_choice("scheduler.weight_decay_incr_style", self.weight_decay_incr_style, WEIGHT_DECAY_INCR_STYLES)
        if not is_int(self.lr_warmup_iters) or self.lr_warmup_iters < 0:
            raise config_error("scheduler.lr_warmup_iters", self.lr_warmup_iters, "an integer >= 0")
        check_number("scheduler.lr_warmup_init", self.lr_warmup_init, "a finite number >= 0", ok=lambda v: v >= 0)
        check_positive("scheduler.lr_decay_iters", self.lr_decay_iters)
        check_positive("scheduler.lr_wsd_decay_iters", self.lr_wsd_decay_iters)
        for name in ("start_weight_decay", "end_weight_decay"):
            check_number(f"scheduler.{name}", getattr(self, name), "a finite number >= 0 or None",
                          ok=lambda v: v >= 0, optional=True)


@dataclass(kw_only=True)
class CheckpointConfig(KnownFieldsOnly):
    """Where and how often to save, and what to load at start."""

    _section = "checkpoint"

    save: str | None = None
    """Directory to save checkpoints into (None: never save)."""
    save_interval: int | None = None
    """Save every this many steps (None: only at the end of training)."""
    load: str | None = None
    """Directory to resume from (None: `save`, when it holds a checkpoint)."""
    most_recent_k: int = -1
    """Keep only this many newest checkpoints (-1: keep all)."""
    save_optim: bool = True
    """Save optimizer and scheduler state."""
    save_rng: bool = True
    """Save random number generator states."""
    load_optim: bool = True
    """Restore optimizer and scheduler state on resume."""
    load_rng: bool = True
    """Restore random number generator states on resume."""
    finetune: bool = False
    """Load model weights only from `load` and start at step 0."""
    pretrained_checkpoint: str | None = None
    """Checkpoint to take initial model weights from (step 0, fresh optimizer)."""
    ckpt_format: str = "torch_dist"
    """On-disk format: torch_dist (torch.distributed.checkpoint)."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""

    def validate(self) -> None:
        check_positive("checkpoint.save_interval", self.save_interval)
        check_choice("checkpoint.ckpt_format", self.ckpt_format, CKPT_FORMATS)
        if not is_int(self.most_recent_k) or self.most_recent_k == 0 or self.most_recent_k < -1:
            raise config_error("checkpoint.most_recent_k", self.most_recent_k, "-1 (keep all) or a positive integer")


@dataclass(kw_only=True)
class LoggerConfig(KnownFieldsOnly):
    """Console, TensorBoard and Weights & Biases logging."""

    _section = "logger"

    log_interval: int = 100
    """Print a log line every this many steps (and always after the first and the last iteration)."""
    timing_log_level: int = 0
    """Which timers run (Megatron's levels): 0 the iteration time only; 1 also once-per-step phases
    (`forward-backward`, `all-grads-sync`, `optimizer`, ...), printed after each log line; 2 finer ones."""
    timing_log_option: str = "minmax"
    """How the timers' times across ranks are printed: max, minmax or all (every rank)."""
    tensorboard_dir: str | None = None
    """Write TensorBoard event files here (None: no TensorBoard)."""
    tensorboard_log_interval: int = 1
    """Write the training scalars to TensorBoard (and W&B) every this many steps."""
    tensorboard_queue_size: int = 1000
    """TensorBoard events held in memory before the writer flushes them to disk."""
    log_timers_to_tensorboard: bool = False
    """Also write the iteration time and the timers (`<name>-time`) to TensorBoard."""
    log_loss_scale_to_tensorboard: bool = True
    """Write the loss scale (`loss-scale`) to TensorBoard."""
    log_validation_ppl_to_tensorboard: bool = False
    """Also write validation and test perplexities to TensorBoard."""
    log_throughput: bool = True
    """Show tokens/s and model TFLOP/s per device in the log line."""
    log_throughput_to_tensorboard: bool = False
    """Write throughput to TensorBoard: `throughput/tflops/device` and `throughput/tflops` at each log line,
    `throughput/tokens_per_sec` and the other rates over the last `throughput_window_size` steps."""
    throughput_window_size: int = 100
    """Steps in the rolling window of TensorBoard's `throughput/*_per_sec` rates."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (needs the `wandb` extra)."""
    wandb_exp_name: str | None = None
    """Run name in Weights & Biases."""
    wandb_save_dir: str | None = None
    """Local directory for Weights & Biases files."""
    wandb_entity: str | None = None
    """Weights & Biases team or user."""
    callback_time_warning_share: float = 0.2
    """Warn (once per callback) when one callback takes more than this share of the step time."""

    def validate(self) -> None:
        check_positive("logger.log_interval", self.log_interval, optional=False)
        for name in ("tensorboard_log_interval", "tensorboard_queue_size", "throughput_window_size"):
            check_positive(f"logger.{name}", getattr(self, name), optional=False)
        if not is_int(self.timing_log_level) or self.timing_log_level not in TIMING_LOG_LEVELS:
            raise config_error("logger.timing_log_level", self.timing_log_level,
                               "0 (iteration time), 1 (once-per-step phases) or 2 (finer)")
        check_choice("logger.timing_log_option", self.timing_log_option, TIMING_LOG_OPTIONS)
        for name in ("log_timers_to_tensorboard", "log_loss_scale_to_tensorboard",
                     "log_validation_ppl_to_tensorboard", "log_throughput", "log_throughput_to_tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(f"logger.{name}", getattr(self, name), "True or False")
        check_number("logger.callback_time_warning_share", self.callback_time_warning_share,
                      "a share of the step time in (0, 1]", ok=lambda v: 0.0 < v <= 1.0)
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise config_error("logger.wandb_project", self.wandb_project,
                               "None, or install wandb first: pip install 'megatron-bridge-lite[wandb]'")


@dataclass(kw_only=True)
class RNGConfig(KnownFieldsOnly):
    """Random seeds."""

    _section = "rng"

    seed: int = 1234
    """Seed for Python, NumPy and torch (model initialisation, dropout)."""

    def validate(self) -> None:
        check_seed("rng.seed", self.seed)


@dataclass(kw_only=True)
class DistributedDataParallelConfig(KnownFieldsOnly):
    """How gradients are reduced across data-parallel ranks."""

    _section = "ddp"

    grad_reduce_in_fp32: bool = False
    """Reduce gradients in fp32 even when training in bf16/fp16."""
    overlap_grad_reduce: bool = True
    """Overlap the gradient all-reduce with the backward pass (DDP's buckets reduce as gradients are ready).
    False: reduce every gradient once the last micro-batch's backward pass has finished. FSDP2 always
    overlaps its reduce-scatter, so False needs `use_distributed_optimizer` off."""
    check_for_nan_in_grad: bool = False
    """Raise an error naming the step when the gradient norm is not finite (instead of skipping)."""
    use_distributed_optimizer: bool | None = None
    """Shard parameters, gradients and optimizer state across ranks (FSDP2). One switch with
    `optimizer.use_distributed_optimizer`: set either (None: follow the other, else False)."""

    def validate(self) -> None:
        for name in ("grad_reduce_in_fp32", "overlap_grad_reduce", "check_for_nan_in_grad"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(f"ddp.{name}", getattr(self, name), "True or False")


@dataclass(kw_only=True)
class DistributedInitConfig(KnownFieldsOnly):
    """How the process group is created."""

    _section = "dist"

    distributed_backend: str | None = None
    """nccl or gloo (None: nccl on GPU, gloo on CPU)."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""

    def validate(self) -> None:
        if self.distributed_backend is not None:
            check_choice("dist.distributed_backend", self.distributed_backend, DIST_BACKENDS)
        check_positive("dist.distributed_timeout_minutes", self.distributed_timeout_minutes, optional=False)


@dataclass(kw_only=True)
class ConfigContainer(KnownFieldsOnly):
    """Everything a run needs; `pretrain` validates it before any work starts."""

    _section = ""

    model: GPTModelProvider
    train: TrainingConfig
    optimizer: OptimizerConfig
    dataset: GPTDatasetConfig | GPTSFTDatasetConfig
    """Pretraining data (indexed datasets, or mock data) or finetuning data (`GPTSFTDatasetConfig`)."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    rng: RNGConfig = field(default_factory=RNGConfig)
    ddp: DistributedDataParallelConfig = field(default_factory=DistributedDataParallelConfig)
    dist: DistributedInitConfig = field(default_factory=DistributedInitConfig)
    mixed_precision: str | None = None
    """bf16_mixed, fp16_mixed, fp32 or None (None: from optimizer.bf16 / optimizer.fp16)."""
    peft: PEFT | None = None
    """Parameter-efficient finetuning (`megatron.bridge.peft.lora.LoRA`, `...dora.DoRA`): applied after the
    base weights load and before the model is wrapped; the base is frozen and checkpoints hold the adapters."""

    def validate(self, *, data_parallel_size: int = 1) -> None:
        """Check every field and every cross-field rule; raise `ValueError` on the first failure."""
        for sub in (self.train, self.validation, self.optimizer, self.scheduler, self.dataset,
                    self.tokenizer, self.checkpoint, self.logger, self.rng, self.ddp, self.dist):
            sub.validate()
        self.model.validate()
        if self.peft is not None:
            self.peft.validate()
            self.peft.sites(self.model)  # every target must name layers this model has
        self._validate_precision()
        self._validate_batch(data_parallel_size)
        self._validate_sharding()
        if self.model.seq_length != self.dataset.seq_length:
            raise config_error(
                "dataset.seq_length", self.dataset.seq_length,
                f"equal to model.seq_length={self.model.seq_length}",
            )
        if self.model.vocab_size is not None and self.tokenizer.vocab_size is not None:
            if self.model.vocab_size < self.tokenizer.vocab_size:
                raise config_error(
                    "model.vocab_size", self.model.vocab_size,
                    f"at least tokenizer.vocab_size={self.tokenizer.vocab_size} (or None to follow it)",
                )
        if not self.validation.skip_train and self.train.train_iters is None:
            raise config_error("train.train_iters", None, "a positive integer (or set validation.skip_train=True)")
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        # Everything the scheduler itself would refuse, checked here so that the message names config keys.
        scheduler = self.scheduler
        decay_iters = scheduler.lr_decay_iters or self.train.train_iters
        trains = not self.validation.skip_train and decay_iters is not None
        if trains and scheduler.lr_warmup_iters >= decay_iters:
            # Megatron Bridge caps it for smoke runs rather than refusing (the schedule needs one decay step).
            warnings.warn(
                f"scheduler.lr_warmup_iters={scheduler.lr_warmup_iters} is not shorter than the decay span "
                f"({decay_iters} steps): warming up over {capped_warmup_iters(scheduler.lr_warmup_iters, decay_iters)} "
                "steps instead; lower scheduler.lr_warmup_iters (or raise train.train_iters) to silence this",
                UserWarning, stacklevel=2,  # one location for every validation: shown once
            )
        if scheduler.weight_decay_incr_style != "constant":
            return
        start, end = scheduler.start_weight_decay, scheduler.end_weight_decay
        base = self.optimizer.weight_decay
        constant = "with scheduler.weight_decay_incr_style='constant' (or choose 'linear' or 'cosine')"
        if end is not None and end != (base if start is None else start):
            source = "optimizer.weight_decay" if start is None else "scheduler.start_weight_decay"
            raise config_error("scheduler.end_weight_decay", end,
                               f"equal to {source}={base if start is None else start} {constant}")
        if end is None and start is not None and start != base:
            raise config_error("scheduler.start_weight_decay", start,
                               f"equal to optimizer.weight_decay={base} (the end while scheduler.end_weight_decay "
                               f"is None) {constant}")

    def _validate_sharding(self) -> None:
        ddp, optimizer = self.ddp.use_distributed_optimizer, self.optimizer.use_distributed_optimizer
        for name, value in (("ddp.use_distributed_optimizer", ddp),
                            ("optimizer.use_distributed_optimizer", optimizer)):
            if value is not None and not isinstance(value, bool):
                raise config_error(name, value, "True, False or None (None: follow the other spelling)")
        if ddp is not None and optimizer is not None and ddp != optimizer:
            raise config_error("optimizer.use_distributed_optimizer", optimizer,
                               f"equal to ddp.use_distributed_optimizer={ddp} (one switch spelled twice; "
                               "set one of them, or both alike)")
        if self.uses_distributed_optimizer and not self.ddp.overlap_grad_reduce:
            raise config_error("ddp.overlap_grad_reduce", False,
                               "True with use_distributed_optimizer (FSDP2 reduce-scatters during the backward "
                               "pass); or turn use_distributed_optimizer off")

    @property
    def uses_distributed_optimizer(self) -> bool:
        """Whether parameters, gradients and optimizer state are sharded (FSDP2): either spelling of the switch."""
        return bool(self.ddp.use_distributed_optimizer or self.optimizer.use_distributed_optimizer)

    def _validate_precision(self) -> None:
        if self.mixed_precision is None:
            return
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_RECIPES)
        conflict = (self.mixed_precision == "bf16_mixed" and self.optimizer.fp16) or (
            self.mixed_precision == "fp16_mixed" and self.optimizer.bf16
        )
        if conflict:
            raise config_error(
                "mixed_precision", self.mixed_precision,
                f"consistent with optimizer.bf16={self.optimizer.bf16} and optimizer.fp16={self.optimizer.fp16}",
            )

    def _validate_batch(self, data_parallel_size: int) -> None:
        gbs, mbs = self.train.global_batch_size, self.train.micro_batch_size
        if gbs % (mbs * data_parallel_size) != 0:
            raise config_error(
                "train.global_batch_size", gbs,
                f"a multiple of micro_batch_size ({mbs}) x data-parallel size ({data_parallel_size})",
            )

    @property
    def compute_dtype(self) -> str:
        """The autocast precision this config asks for: "bf16", "fp16" or "fp32"."""
        if self.mixed_precision == "bf16_mixed" or (self.mixed_precision is None and self.optimizer.bf16):
            return "bf16"
        if self.mixed_precision == "fp16_mixed" or (self.mixed_precision is None and self.optimizer.fp16):
            return "fp16"
        return "fp32"

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-serialisable view of the whole config."""
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


