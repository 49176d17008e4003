"""The main job: pretrain the tiny Qwen2.5-shaped recipe on the CPU with the callback guide's examples.

    python examples/demo.py             # or: make demo
    torchrun --nproc-per-node 2 examples/demo.py

Attaches the guide's class-based callback and a functional one through one `CallbackManager`,
trains 100 steps on mock data, validates, tests, and writes TensorBoard logs.
"""

from __future__ import annotations

import os
import time

from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


class MyCallback(Callback):
    """The guide's class-based example."""

    def on_train_start(self, context):
        context.user_state["start_time"] = time.time()
        print(f"Training started at step {context.state.train_state.step}")

    def on_train_step_end(self, context):
        if context.loss_dict and context.state.train_state.step % 20 == 19:
            print(f"Step {context.state.train_state.step}: loss={context.loss_dict}")

    def on_train_end(self, context):
        elapsed = time.time() - context.user_state["start_time"]
        print(f"Training completed in {elapsed:.2f}s")


class StepCounterCallback(Callback):
    """The guide's user_state example."""

    def on_train_start(self, context):
        context.user_state["callback_step_count"] = 0

    def on_train_step_end(self, context):
        context.user_state["callback_step_count"] += 1

    def on_train_end(self, context):
        print(f"Callback saw {context.user_state['callback_step_count']} steps")


def report_eval(context):
    """A functional callback: remember the validation losses."""
    losses = context.user_state.setdefault("validation_losses", [])
    losses.append(float(context.total_loss_dict["lm loss"]))


def main() -> None:
    config = qwen25_tiny_pretrain_config()
    config.logger.tensorboard_dir = os.path.join(os.getcwd(), "runs", "demo", "tb_logs")

    manager = CallbackManager()
    manager.add([MyCallback(), StepCounterCallback()])
    manager.register("on_eval_end", report_eval)
    manager.register("on_test_end", lambda ctx: print(f"Test loss: {float(ctx.total_loss_dict['lm loss']):.3f}"))

    pretrain(config, forward_step, callbacks=manager)

    print(f"Validation losses seen by the callback: {[round(x, 3) for x in manager.user_state['validation_losses']]}")
    log_dir = config.logger.tensorboard_dir
    print(f"TensorBoard logs: {log_dir}  (view them with: tensorboard --logdir {log_dir})")


if __name__ == "__main__":
    main()
