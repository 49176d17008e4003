"""Building every component of a run, in order, from a validated `ConfigContainer`."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from megatron.bridge.data.index_cache import rank_zero_first
from megatron.bridge.data.loaders import DataIterators, build_data_iterators
from megatron.bridge.data.sft.builder import build_sft_data_iterators
from megatron.bridge.data.sft.config import GPTSFTDatasetConfig
from megatron.bridge.peft.base import freeze_summary
from megatron.bridge.peft.flops import lora_flops_per_token
from megatron.bridge.peft.state import is_adapter_param
from megatron.bridge.training.callbacks import CallbackContext, CallbackManager, should_fire
from megatron.bridge.training.checkpoint_loading import keep_all
from megatron.bridge.training.checkpointing import CheckpointManager
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.forward_backward import ForwardStep
from megatron.bridge.training.memory import estimate_memory
from megatron.bridge.training.metrics import MetricsLogger, model_flops_per_token
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.optim import OptimizerParamScheduler, setup_optimizer
from megatron.bridge.training.parallelize import parallelize, uses_fsdp
from megatron.bridge.training.run_report import (
    describe_run,
    phase,
    print_config_differences,
    print_memory_estimate,
    print_resume_differences,
)
from megatron.bridge.training.state import GlobalState
from megatron.bridge.training.step_ledger import StepLedger
from megatron.bridge.utils.logging import print_rank_0
from megatron.bridge.utils.parallel import ParallelLayout

__all__ = ["SetupOutput", "set_seed", "setup"]


@dataclass
class SetupOutput:
    """Everything the training and evaluation loops use."""

    state: GlobalState
    model: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: OptimizerParamScheduler
    forward_step: ForwardStep
    callbacks: CallbackManager | None
    data: DataIterators
    checkpointer: CheckpointManager
    metrics: MetricsLogger
    precision: MixedPrecision
    ledger: StepLedger
    layout: ParallelLayout
    num_microbatches: int


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(state: GlobalState, forward_step: ForwardStep, callbacks: CallbackManager | None,
          layout: ParallelLayout) -> SetupOutput:
    """Build every component of the run, in this order (each step needs the ones before it):

    seed; claim the save folder; build the model and fill it with the weights it starts from; apply the
    transforms (LoRA, DoRA: they freeze the base and add adapters); compile and wrap it (DDP or FSDP2);
    build the optimizer over what is trainable; resume a checkpoint; build the data iterators.
    """
    cfg = state.cfg
    print_config_differences(cfg)
    set_seed(cfg.rng.seed)
    # Claims checkpoint.save (created, locked for this run) before anything is built or loaded.
    checkpointer = CheckpointManager(cfg.checkpoint, state=state, callbacks=callbacks)
    try:
        return _build(state, forward_step, callbacks, layout, checkpointer)
    except BaseException:
        checkpointer.close()  # gives the save folder back: the run ends here
        raise


def _build(state: GlobalState, forward_step: ForwardStep, callbacks: CallbackManager | None, layout: ParallelLayout,
           checkpointer: CheckpointManager) -> SetupOutput:
    cfg = state.cfg
    with phase("building the model"):
        raw_model = cfg.model.provide().to(layout.device)
    checkpointer.load_base_weights(raw_model, adapted=cfg.peft is not None)
    if cfg.peft is not None:
        raw_model = cfg.peft(raw_model)
        print_rank_0(f"> {freeze_summary(raw_model)}")
    flops = _flops_per_token(cfg, raw_model)
    num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data_parallel_size)
    print_rank_0(describe_run(cfg, raw_model, layout, sharded=uses_fsdp(cfg), num_microbatches=num_microbatches))
    print_memory_estimate(estimate_memory(raw_model, cfg, data_parallel_size=layout.data_parallel_size), cfg, layout,
                          ranks_per_machine=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    model = [parallelize(raw_model, cfg, layout)]
    # With skip_train there may be no train_iters: the schedule is never stepped but must still be valid.
    schedule_span = cfg.train.train_iters or max(cfg.scheduler.lr_warmup_iters, 1)
    optimizer, scheduler = setup_optimizer(cfg.optimizer, cfg.scheduler, model, train_iters=schedule_span)
    precision = MixedPrecision(cfg.compute_dtype, layout.device, initial_loss_scale=cfg.optimizer.initial_loss_scale,
                               min_loss_scale=cfg.optimizer.min_loss_scale,
                               loss_scale_window=cfg.optimizer.loss_scale_window)
    # A LoRA run saves and resumes its adapters only: the base comes from where it came from this time.
    checkpointer.attach(model=model, optimizer=optimizer, scheduler=scheduler, precision=precision,
                        keep=keep_all if cfg.peft is None else is_adapter_param)
    resume = checkpointer.resume_directory()
    with phase(f"loading the checkpoint {resume}") if resume is not None else contextlib.nullcontext():
        checkpointer.resume()
    if resume is not None:
        print_resume_differences(cfg, resume)

    if should_fire(callbacks, "on_data_init_start"):
        callbacks.fire("on_data_init_start", CallbackContext(
            state=state, model=model, user_state=callbacks.user_state, optimizer=optimizer, scheduler=scheduler,
        ))
    with phase("building the datasets and their sample indices"):
        data = _build_data(state, layout)
    _record_what_runs(state, data)
    metrics = MetricsLogger(state, flops_per_token=flops, world_size=layout.world_size, device=layout.device,
                            callbacks=callbacks, precision=precision)
    return SetupOutput(
        state=state, model=model, optimizer=optimizer, scheduler=scheduler, forward_step=forward_step,
        callbacks=callbacks, data=data, checkpointer=checkpointer, metrics=metrics,
        precision=precision, ledger=_build_ledger(state, scheduler, optimizer, precision), layout=layout,
        num_microbatches=num_microbatches,
    )


def _flops_per_token(cfg: ConfigContainer, model: torch.nn.Module) -> float:
    # A LoRA step computes no weight gradients for the frozen base: count what it really does.
    count = model_flops_per_token if cfg.peft is None else lora_flops_per_token
    return count(model, num_layers=cfg.model.num_layers, seq_length=cfg.model.seq_length,
                 attention_width=cfg.model.num_attention_heads * cfg.model.resolved_kv_channels)


def _record_what_runs(state: GlobalState, data: DataIterators) -> None:
    # As Megatron Bridge: set from this run's config and data, after any checkpoint's values were loaded.
    cfg, train_state = state.cfg, state.train_state
    evaluates = cfg.validation.eval_iters > 0
    train_state.do_train = not cfg.validation.skip_train and data.train is not None and bool(cfg.train.train_iters)
    train_state.do_valid = evaluates and data.valid is not None
    train_state.do_test = evaluates and data.test is not None


def _build_ledger(state: GlobalState, scheduler: OptimizerParamScheduler, optimizer: torch.optim.Optimizer,
                  precision: MixedPrecision) -> StepLedger:
    # Fused Adam (the default on GPUs) skips a non-finite update on the device: no need to wait for each norm.
    deferred = bool(optimizer.defaults.get("fused")) and precision.scaler is None
    return StepLedger(train_state=state.train_state, scheduler=scheduler, deferred=deferred,
                      global_batch_size=state.cfg.train.global_batch_size,
                      raise_on_nan=state.cfg.ddp.check_for_nan_in_grad)


def _build_data(state: GlobalState, layout: ParallelLayout) -> DataIterators:
    from megatron.bridge.data.tokenizer import build_tokenizer

    cfg, train_state = state.cfg, state.train_state
    gbs = cfg.train.global_batch_size
    train_iters = 0 if cfg.validation.skip_train else cfg.train.train_iters
    # The train stream resumes at sample `consumed` whatever the batch size it was consumed with (as
    # Megatron's sampler does), so the dataset holds those samples plus this run's remaining steps.
    consumed = train_state.consumed_train_samples
    samples = {
        "train_samples": consumed + max(train_iters - train_state.step, 0) * gbs if train_iters else 0,
        # Size the validation stream for every in-training pass plus the final one.
        "valid_samples": ((train_iters // cfg.validation.eval_interval if cfg.validation.eval_interval else 0) + 1)
        * cfg.validation.eval_iters * gbs,
        "test_samples": cfg.validation.eval_iters * gbs,
        "consumed_train_samples": consumed, "consumed_valid_samples": train_state.consumed_valid_samples,
        "micro_batch_size": cfg.train.micro_batch_size, "global_batch_size": gbs,
        "dp_rank": layout.data_parallel_rank, "dp_size": layout.data_parallel_size,
    }
    if isinstance(cfg.dataset, GPTSFTDatasetConfig):
        # Rank 0 tokenizes (and packs) first and caches; the other ranks then read its caches.
        with rank_zero_first():
            data, stats = build_sft_data_iterators(cfg.dataset, build_tokenizer(cfg.tokenizer), **samples)
        for line in stats.log_lines():
            print_rank_0(line)
        return data
    # Real data needs the tokenizer's end-of-document id (for eod_mask_loss and the resets); mock data
    # makes its own, so it never loads a tokenizer.
    eod = None if cfg.dataset.uses_mock_data else build_tokenizer(cfg.tokenizer).eod
    return build_data_iterators(cfg.dataset, vocab_size=cfg.tokenizer.vocab_size, eod=eod, **samples)
