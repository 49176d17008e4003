"""The training loop, its configuration, state and callbacks.

| module | what |
| --- | --- |
| `pretrain`, `finetune` | the entry points |
| `config` | `ConfigContainer` and its sections |
| `callbacks`, `builtin_callbacks` | the callback API (`Callback`, `CallbackManager`, ...) and ready-made callbacks |
| `state` | `GlobalState`, `TrainState` |
| `gpt_step` | the default `forward_step` |
| `optim` | the optimizer, `OptimizerParamScheduler`, the gradient norm |
| `checkpointing` | what a checkpoint holds and when one is written |
| `timers` | Megatron's `Timers` (`state.timers`) |
| `metrics`, `scalar_writer` | the log line; TensorBoard and W&B scalars |
| `run_report`, `memory` | what a run prints at start and at the end; the memory estimate |
| `setup`, `train`, `eval`, `forward_backward`, ... | the loop itself |
"""

from megatron.bridge.utils.lazy import lazy_attributes

# Its modules, each imported on first access: `import` of the package is enough to reach them.
__all__ = [
    "builtin_callbacks",
    "callbacks",
    "checkpoint_state",
    "checkpointing",
    "config",
    "distributed",
    "eval",
    "exit_conditions",
    "finetune",
    "forward_backward",
    "gpt_step",
    "memory",
    "metrics",
    "mixed_precision",
    "optim",
    "parallelize",
    "pretrain",
    "run_report",
    "scalar_writer",
    "setup",
    "state",
    "step_ledger",
    "timers",
    "train",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), dict.fromkeys(__all__))
del lazy_attributes
