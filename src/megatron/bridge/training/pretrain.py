"""`pretrain`: validate the config, build the run, train, validate and test, tear down."""

from __future__ import annotations

import datetime
import gc
import time
from collections.abc import Callable
from typing import Any

from megatron.bridge.training.callbacks import Callback, CallbackManager, normalize_callbacks
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.state import GlobalState
from megatron.bridge.utils.logging import print_rank_0
from megatron.bridge.utils.parallel import data_parallel_size, launched_world_size

__all__ = ["planned_data_parallel_size", "pretrain"]


def pretrain(
    config: ConfigContainer,
    forward_step_func: Callable[..., Any],
    callbacks: CallbackManager | Callback | list[Callback] | None = None,
) -> None:
    """Pretrain `config.model` on `config.dataset`, firing the callbacks' events along the way.

    Args:
        config: the run's configuration; validated before any work starts.
        forward_step_func: `forward_step(state, data_iterator, model)` returning
            `(output_tensor, loss_func)`; the `(data_iterator, model)` form is accepted too.
        callbacks: a `CallbackManager`, a `Callback`, a list of them, or None.
    """
    from megatron.bridge.training import distributed
    from megatron.bridge.training.eval import evaluate
    from megatron.bridge.training.exit_conditions import SignalCatcher
    from megatron.bridge.training.forward_backward import adapt_forward_step
    from megatron.bridge.training.run_report import print_summary
    from megatron.bridge.training.setup import setup
    from megatron.bridge.training.train import train

    manager = normalize_callbacks(callbacks)
    forward_step = adapt_forward_step(forward_step_func)
    _resolve_vocab_size(config)
    config.validate(data_parallel_size=planned_data_parallel_size(config))
    layout = distributed.initialize(config.dist, tensor_parallel_size=config.model.tensor_model_parallel_size)
    state = GlobalState(config)
    run = None
    results: dict[str, Any] = {}
    try:
        run = setup(state, forward_step, manager, layout)
        timeout = datetime.timedelta(minutes=config.dist.distributed_timeout_minutes)
        progress = _Progress(run)
        with SignalCatcher(config.train.exit_signal_handler, timeout=timeout, describe=progress.describe) as signals:
            progress.signals = signals
            completed = config.validation.skip_train or train(run)
            progress.trained = True
            for mode in ("eval", "test") if completed else ():
                received = signals.received_on_any_rank()
                if received:
                    skipped = "validation and test passes" if mode == "eval" else "test pass"
                    print_rank_0(f"> {received}: skipping the post-training {skipped}")
                    break
                results[mode] = evaluate(run, mode, final=True)
        print_summary(config, run.metrics.totals, wall_seconds=time.time() - state.start_time,
                      final_step=state.train_state.step, results=results, completed=completed)
    finally:
        if run is not None:
            run.checkpointer.close()
        # Free the wrapped model (and DDP's pending gloo work) while the process group still exists;
        # destroying the group first can deadlock gloo's worker threads against the interpreter lock.
        run = None
        gc.collect()
        state.close_loggers()
        distributed.teardown(layout)


class _Progress:
    """What a run does after a first Ctrl-C, in words, for the acknowledgement printed at once."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.signals: Any = None
        self.trained = False
        """True once the training loop (and its final save) is over: only the passes remain."""

    def describe(self) -> str:
        """E.g. "finishing iteration 7, then saving and stopping"."""
        cfg, step = self.run.state.cfg, self.run.state.train_state.step
        current_pass = self.signals.current_pass if self.signals is not None else None
        if self.trained:
            now = f"stopping the {current_pass} pass after this step" if current_pass else "finishing this step"
            return f"{now}, then skipping the post-training passes"
        then = "then saving and stopping" if cfg.checkpoint.save else "then stopping"
        if current_pass:
            return f"stopping the {current_pass} pass after this step, {then}"
        if step >= cfg.train.train_iters:
            return "finishing the final checkpoint, then skipping the post-training passes"
        return f"finishing iteration {step + 1}, {then}"


def _resolve_vocab_size(config: ConfigContainer) -> None:
    # A Hugging Face tokenizer's size is a fact of its file, not a setting: read it before validating,
    # so that the model's vocabulary and the data's token-id check both follow the real tokenizer.
    if config.tokenizer.tokenizer_type == "HuggingFaceTokenizer":
        from megatron.bridge.data.tokenizer import build_tokenizer

        config.tokenizer.validate()
        config.tokenizer.vocab_size = build_tokenizer(config.tokenizer).vocab_size
    # The recipes leave model.vocab_size unset so that the model follows the tokenizer.
    if config.model.vocab_size is None:
        config.model.vocab_size = config.tokenizer.vocab_size


def planned_data_parallel_size(config: ConfigContainer) -> int:
    """The data-parallel size the launcher's processes will make, known before any process group exists."""
    return data_parallel_size(launched_world_size(), config.model.tensor_model_parallel_size)
