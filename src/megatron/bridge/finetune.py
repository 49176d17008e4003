"""`python -m megatron.bridge.finetune --recipe NAME [--config-file YAML] [key=value ...]`.

The command line lives in `megatron.bridge.cli`; this module only makes it runnable with `-m`
(also under `torchrun -m`). The console script `megatron-bridge-finetune` runs the same function.
"""

from megatron.bridge.cli import FINETUNE_MODULE_PROG, finetune_main

__all__: list[str] = []  # the `-m` entry point only

if __name__ == "__main__":
    finetune_main(prog=FINETUNE_MODULE_PROG)
