"""On one GPU: bf16 training with compiled blocks matches eager, and steps never wait for the host.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
`python -m pytest -q tests/training/test_gpu.py`.
"""

import pytest
import torch

from helpers import make_tiny_config
from megatron.bridge.training.builtin_callbacks import ThroughputMonitor
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bf16_config(**overrides):
    cfg = make_tiny_config(mixed_precision="bf16_mixed", optimizer__bf16=True, **overrides)
    cfg.model.num_layers = 2
    return cfg


def _train_losses(compile_blocks: bool) -> list[float]:
    cfg = _bf16_config(train__train_iters=6)
    cfg.train.compile = compile_blocks
    losses: list[float] = []
    manager = CallbackManager()
    manager.register("on_train_step_end", lambda ctx: losses.append(ctx.loss_dict["lm loss"].item()))
    pretrain(cfg, forward_step, callbacks=manager)
    return losses


def test_compiled_blocks_match_eager_in_bf16_on_the_gpu(chdir):
    eager = _train_losses(False)
    compiled = _train_losses(True)
    assert len(eager) == len(compiled) == 6
    # bf16 keeps 8 bits of mantissa (resolution 7.8e-3); fusion reorders its roundings.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=0)
    assert eager[-1] < eager[0]


class _NoSyncWindow:
    """Turns CUDA's sync checker to "error" from the start of step `first` to the start of step `last`.

    The callback asks for no value, so it must not cause a read: a host-device synchronisation the
    checker sees in between (an `.item()`, a blocking device-to-host copy, a stream synchronize)
    raises inside the loop. (The checker does not see every kind: not a non-blocking copy from
    pageable host memory, for one.)
    """

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.checked_steps: list[int] = []

    def __call__(self, context) -> None:
        step = context.state.train_state.step
        if step == self.first:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif step == self.last:
            torch.cuda.set_sync_debug_mode("default")
        if self.first <= step < self.last:
            self.checked_steps.append(step)


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_training_steps_never_wait_for_the_gpu_between_log_lines(chdir, compile_blocks):
    cfg = _bf16_config(train__train_iters=8, logger__log_interval=8)
    cfg.train.compile = compile_blocks
    # Long enough sequences and a large enough vocabulary for the loss to run in several checkpointed
    # chunks, as the recipes' does: 2 x 1024 tokens, 2^27 / 2^17 = 1024 tokens per chunk.
    cfg.model.seq_length = cfg.dataset.seq_length = 1024
    cfg.tokenizer.vocab_size = 2**17
    window = _NoSyncWindow(first=2, last=7)
    manager = CallbackManager()
    manager.register("on_train_step_start", window)
    # Callbacks that read no value must not cause a wait either: one that ignores its context, and
    # ThroughputMonitor, which waits only at the end of its window (step 8, after the checked steps).
    manager.register("on_train_step_end", lambda context: None)
    manager.add(ThroughputMonitor(log_every=8))
    try:
        pretrain(cfg, forward_step, callbacks=manager)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window.checked_steps == [2, 3, 4, 5, 6]
