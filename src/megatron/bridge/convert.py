"""Convert checkpoints between Hugging Face folders and this package's training checkpoints.

    python -m megatron.bridge.convert import ./Qwen2.5-0.5B ./checkpoints/qwen-0.5b
    python -m megatron.bridge.convert export ./runs/sft/checkpoints ./Qwen2.5-0.5B-sft [--iteration 500]
    python -m megatron.bridge.convert export-adapter ./runs/lora/checkpoints ./qwen-lora [--base-model ./Qwen2.5-0.5B]

`import` writes a step-0 checkpoint for `checkpoint.pretrained_checkpoint`; `export` writes a folder
that `transformers.AutoModelForCausalLM.from_pretrained` loads; `export-adapter` writes a LoRA / DoRA
run's adapters as a folder that `peft.PeftModel.from_pretrained(base, folder)` loads. None overwrites
a non-empty output folder without `--overwrite`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron.bridge.utils.errors import INTERRUPTED_STATUS, UserError, one_line

__all__ = ["build_parser", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    """The command line: `import HF_PATH MEGATRON_PATH` and `export MEGATRON_PATH HF_PATH`."""
    parser = argparse.ArgumentParser(prog="python -m megatron.bridge.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face folder -> training checkpoint (step 0)")
    imp.add_argument("hf_path", help="local Hugging Face model folder (config.json + safetensors)")
    imp.add_argument("megatron_path", help="checkpoint folder to create")
    exp = commands.add_parser("export", help="training checkpoint -> Hugging Face folder")
    exp.add_argument("megatron_path", help="checkpoint folder (its latest iteration) or one iter_* folder")
    exp.add_argument("hf_path", help="Hugging Face folder to create")
    exp.add_argument("--iteration", type=int, default=None, help="export this iteration instead of the latest")
    exp.add_argument("--source", default=None,
                     help="Hugging Face folder to take config.json and tokenizer files from (default: the ones "
                          "stored at import)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    ada = commands.add_parser("export-adapter", help="LoRA / DoRA run's checkpoint -> Hugging Face PEFT adapter folder")
    ada.add_argument("megatron_path", help="checkpoint folder of a LoRA or DoRA run (its latest iteration)")
    ada.add_argument("adapter_path", help="adapter folder to create")
    ada.add_argument("--iteration", type=int, default=None, help="export this iteration instead of the latest")
    ada.add_argument("--base-model", default=None,
                     help="base_model_name_or_path for adapter_config.json (default: the Hugging Face folder the run "
                          "started from, when its run_config.yaml names one)")
    for sub in (imp, exp, ada):
        sub.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                         help="convert tensors to this dtype (default: keep the source's)")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one conversion and return the exit status: 0 (where the result is printed), 1 after a one-line
    error (a bad folder, a checkpoint that does not fit), 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    started = time.perf_counter()
    try:
        from megatron.bridge.models.conversion.auto_bridge import AutoBridge

        if args.command == "import":
            out = AutoBridge.import_ckpt(args.hf_path, args.megatron_path, dtype=dtype, overwrite=args.overwrite)
        elif args.command == "export-adapter":
            out = AutoBridge.export_adapter_ckpt(args.megatron_path, args.adapter_path, iteration=args.iteration,
                                                 base_model_name_or_path=args.base_model, dtype=dtype,
                                                 overwrite=args.overwrite)
        else:
            out = AutoBridge.export_ckpt(args.megatron_path, args.hf_path, iteration=args.iteration,
                                         source=args.source, dtype=dtype, max_shard_size=args.max_shard_size,
                                         overwrite=args.overwrite)
    except UserError as err:
        print(f"{parser.prog}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    print(f"> {args.command.removesuffix('-adapter')}ed to {out} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
