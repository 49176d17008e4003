"""`python -m megatron.bridge.pretrain --recipe NAME [--config-file YAML] [key=value ...]`.

The command line lives in `megatron.bridge.cli`; this module only makes it runnable with `-m`
(also under `torchrun -m`). The console script `megatron-bridge-pretrain` runs the same `main`.
"""

from megatron.bridge.cli import MODULE_PROG, main

__all__: list[str] = []  # the `-m` entry point only

if __name__ == "__main__":
    main(prog=MODULE_PROG)
