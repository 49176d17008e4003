"""`train.compile`: each transformer block compiled with torch.compile, the same losses as eager."""

import pytest
import torch

from helpers import make_tiny_config
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


def _losses(compile_blocks: bool | None) -> tuple[list[float], list[bool]]:
    cfg = make_tiny_config(train__train_iters=4)
    cfg.train.compile = compile_blocks
    manager, losses, compiled = CallbackManager(), [], []
    manager.register("on_train_step_end", lambda ctx: losses.append(ctx.loss_dict["lm loss"].item()))
    manager.register("on_train_start", lambda ctx: compiled.extend(
        getattr(block, "_compiled_call_impl", None) is not None for block in ctx.model[0].layers))
    pretrain(cfg, forward_step, callbacks=manager)
    return losses, compiled


def test_compiled_blocks_train_like_eager_ones(chdir):
    eager, eager_compiled = _losses(False)
    compiled, compiled_flags = _losses(True)
    assert eager_compiled and not any(eager_compiled)
    assert compiled_flags and all(compiled_flags)
    # Fusion reorders float arithmetic: equal well within bf16's resolution (7.8e-3), not bit for bit.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=0)


@pytest.mark.parametrize("setting, expected", [(None, False), (False, False), (True, True)])
def test_compile_defaults_to_off_on_the_cpu(setting, expected):
    from megatron.bridge.training.parallelize import should_compile

    cfg = make_tiny_config()
    cfg.train.compile = setting
    assert should_compile(cfg, torch.device("cpu")) is expected
    assert should_compile(cfg, torch.device("cuda")) is (True if setting is None else setting)
