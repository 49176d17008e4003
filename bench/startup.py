"""Start-up time on the CPU: imports, and `pretrain(...)` to the first training step of the tiny recipe.

Each measurement runs in a fresh interpreter (cold imports, as a user's script sees them) inside a
temporary directory, with the tiny recipe as shipped (TensorBoard logs included, checkpoints off)
shortened to one step. torch.optim imports torch._dynamo the first time an optimizer is built
(about a second, paid by any PyTorch training loop); it is imported and timed separately before
`pretrain` is called, so the rest is this package's own set-up. The phases are stamped by callbacks:

    pretrain() called -> on_data_init_start (model and optimizer built) -> on_train_start (data ready)
    -> on_train_step_start of step 0

    .venv/bin/python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
t0 = time.perf_counter()
import megatron.bridge.training.callbacks
t_callbacks = time.perf_counter()
from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
t_imports = time.perf_counter()
import torch._dynamo  # torch.optim.Optimizer imports it on first use: any PyTorch loop pays this once
t_dynamo = time.perf_counter()
cfg = qwen25_tiny_pretrain_config()
cfg.train.train_iters = 1
cfg.scheduler.lr_warmup_iters = 1
cfg.validation.eval_iters = 0
marks = {}
manager = CallbackManager()
for event in ("on_data_init_start", "on_train_start", "on_train_step_start"):
    manager.register(event, lambda ctx, event=event: marks.setdefault(event, time.perf_counter()))
t_call = time.perf_counter()
pretrain(cfg, forward_step, callbacks=manager)
print("RESULT " + json.dumps({
    "import callbacks": t_callbacks - t0,
    "import pretrain + recipes": t_imports - t_callbacks,
    "import torch._dynamo (torch.optim needs it)": t_dynamo - t_imports,
    "pretrain() -> model and optimizer built": marks["on_data_init_start"] - t_call,
    "-> data ready": marks["on_train_start"] - marks["on_data_init_start"],
    "-> first step starts": marks["on_train_step_start"] - marks["on_train_start"],
    "pretrain() -> first step": marks["on_train_step_start"] - t_call,
}))
"""


def measure_once() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=workdir, capture_output=True, text=True,
                              check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [measure_once() for _ in range(args.runs)]
    print(f"\nstart-up on the CPU, tiny recipe, median of {args.runs} fresh interpreters")
    for phase in runs[0]:
        values = [run[phase] for run in runs]
        print(f"  {phase:42s} {1000 * statistics.median(values):8.1f} ms  (min {1000 * min(values):.1f})")


if __name__ == "__main__":
    main()
